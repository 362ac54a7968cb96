"""The package version, in a module of its own: the CLI, run records and saved configs read it without importing
the package's __init__ (which would put them in an import loop with it, and cost the CLI its heavy imports)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
