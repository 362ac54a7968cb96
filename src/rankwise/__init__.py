"""rankwise: decide where LoRA's rank goes.

measure (`analyze`) -> decide (`make_plan` with a registered strategy and an exact parameter budget) -> apply
(`apply`: peft LoRA, verified) -> train (`train`) -> export (a plain peft LoRA adapter).

    import rankwise
    stats = rankwise.analyze("path/to/model")                  # spectral metrics per layer
    plan = rankwise.make_plan("path/to/model", "spectral", "300k")
    peft_model = rankwise.apply(model, plan)                    # raises unless every rank is as planned
"""

from __future__ import annotations

__version__ = "0.1.0"

import logging as _logging  # noqa: E402

# peft imports bitsandbytes (the qlora extra) when installed, whose CPU backend then logs that an optional
# `kernels` package is missing, on every rankwise command: nothing a user can act on.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

from .allocators import list_allocators, register_allocator  # noqa: E402
from .apply import apply, verify  # noqa: E402
from .plan import Plan, make_plan  # noqa: E402
from .types import Budget, LayerInfo, LayerStats, RankPattern, RankwiseError  # noqa: E402

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
    # The training stage imports transformers' Trainer stack; load it only when asked for.
    if name == "train":
        from .training import train

        return train
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")
