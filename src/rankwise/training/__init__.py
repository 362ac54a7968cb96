"""TRAIN: fine-tune with a rankwise plan on transformers' Trainer + peft, then evaluate, merge or predict.

    from rankwise.training import train, evaluate_run, merge_run, predict
    results = train("minilm", "data/sst2", preset="balanced", max_train_samples=3000, out="runs/sst2")
    evaluate_run("runs/sst2", "data/sst2")
    predict("runs/sst2", "a charming film")   # [{"label": ..., "score": ...}]
"""

from __future__ import annotations

__all__ = ["train", "evaluate_run", "merge_run", "predict", "load_run"]

# Loaded on first use (PEP 562): the CLI imports submodules of this package (options, config) to build its parser,
# and that must not pull in the Trainer stack. name -> module that defines it.
_LAZY = {"train": ".run", "evaluate_run": ".runs", "merge_run": ".runs", "predict": ".runs", "load_run": ".runs"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
