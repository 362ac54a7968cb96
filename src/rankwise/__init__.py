"""rankwise: decide where LoRA's rank goes.

measure (`analyze`) -> decide (`make_plan` with a registered strategy and an exact parameter budget) -> apply
(`apply`: peft LoRA, verified) -> train (`train`) -> export (a plain peft LoRA adapter).

    import rankwise
    stats = rankwise.analyze("path/to/model")                  # spectral metrics per layer
    plan = rankwise.make_plan("path/to/model", "spectral", "300k")
    peft_model = rankwise.apply(model, plan)                    # raises unless every rank is as planned
"""

from __future__ import annotations

import logging as _logging
import sys as _sys
import types as _types

from .version import __version__

# peft imports bitsandbytes (the qlora extra) when installed, whose CPU backend then logs that an optional
# `kernels` package is missing, on every rankwise command: nothing a user can act on.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# Loaded on first use (PEP 562): `import rankwise` and `rankwise --help` stay free of torch, transformers and peft,
# whose import takes seconds. name -> module that defines it.
_LAZY = {
    "register_allocator": ".allocators",
    "apply": ".apply",
    "verify": ".apply",
    "Plan": ".plan",
    "make_plan": ".plan",
    "Budget": ".types",
    "LayerInfo": ".types",
    "LayerStats": ".types",
    "RankPattern": ".types",
    "RankwiseError": ".types",
    "train": ".training",  # the Trainer stack
}

__all__ = [
    "analyze",
    "make_plan",
    "apply",
    "verify",
    "train",
    "load_adapter",
    "export",
    "strategies",
    "register_allocator",
    "Plan",
    "Budget",
    "LayerInfo",
    "LayerStats",
    "RankPattern",
    "RankwiseError",
]


def strategies() -> list[str]:
    """Names of the registered allocators (what `--strategy` accepts)."""
    from .allocators import list_allocators

    return [spec.name for spec in list_allocators()]


def analyze(source, targets=None, **kwargs):
    """Spectral metrics of every target layer of a model or safetensors folder (see `rankwise.stats.analyze`)."""
    from .assets import resolve_model
    from .stats import analyze as _analyze

    if isinstance(source, str):
        source = resolve_model(source)
    return _analyze(source, targets, **kwargs)


def load_adapter(base_model, run_dir):
    """Load any rankwise run folder (plain LoRA, multi-rank, AdaLoRA) onto `base_model`; returns the adapted model.

    The run's task.json names the method that trained it; that method knows its own files."""
    from .methods import method_of_run

    return method_of_run(run_dir).load(base_model, run_dir)


def export(run_dir, out, **kwargs):
    """Write a trained run as a plain peft LoRA adapter (see `rankwise.exporting.export`)."""
    from .exporting import export as _export

    return _export(run_dir, out, **kwargs)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """`rankwise.apply` is the function; importing the submodule of the same name (which training does) makes
    Python bind the module here. An eager `from .apply import apply` used to win by running last; lazily, this
    keeps the function bound."""

    def __setattr__(self, name, value):
        if name == "apply" and isinstance(value, _types.ModuleType):
            value = value.apply
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
