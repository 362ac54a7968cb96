"""COMPARE: experiment runner, results tables, reports and plots (plots.py is the only matplotlib importer)."""

__all__: list[str] = []
