"""COMPARE: experiment files, the resumable sweep, results tables, reports and plots.

`load_experiment(path)` validates an experiment file; `sweep(path, out)` runs its grid; `make_report(out, dir)`
writes the tables and figures. plots.py is the only module that imports matplotlib.
"""

from .report import make_report
from .spec import load_experiment
from .sweep import sweep

__all__ = ["load_experiment", "sweep", "make_report"]
