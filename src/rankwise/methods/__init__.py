"""Training methods: the one seam where LoRA-with-a-plan, multi-rank and AdaLoRA differ.

A method decides three things only (see `base.Method`): how the adapted model is built, which Trainer callbacks
run, and how the trained adapter becomes a plain peft LoRA adapter (export). `training/run.py`, `rankwise export`,
`rankwise.load_adapter` and `rankwise plan --from-run` are method-agnostic: they look the method up by name here.
"""

from __future__ import annotations

from .base import Built, Method, MethodContext, PlainLora, get_method, list_methods, method_of_run, register_method
from . import lora as _lora  # noqa: F401  (registers "lora")

__all__ = ["Built", "Method", "MethodContext", "PlainLora", "get_method", "list_methods", "method_of_run",
           "register_method"]


def _load_optional() -> None:
    """Methods living in their own packages register on import; a missing one is simply not offered."""
    import importlib

    for mod in ("rankwise.tuners.multirank.method", "rankwise.dynamic.method", "rankwise.methods.peft_eva"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # not built yet in this checkout
            if e.name != mod and not mod.startswith(str(e.name)):
                raise


_load_optional()
