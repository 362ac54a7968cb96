"""The `Method` protocol and its registry (one registry, like the allocators').

Lifecycle inside `rankwise train` (training/run.py):
  1. `check(options, choice)`         before any model loads: reject bad method options in under a second
  2. `build(base_model, ctx)`   -> Built: the adapted model, the plan written as plan.json, LoRA params spent
  3. `callbacks(built, ctx)`    Trainer callbacks (AdaLoRA's allocation step, ...); ctx.total_steps is known here
  4. `finish(built, ctx, run_dir)` after training: raise if the method silently degraded; write its tables/plots;
                                  return extra results (merged into results.json under "method_info")
  5. `save(built, run_dir)`     the adapter files (default: peft's save_pretrained)
Using a finished run folder (task.json names its method):
  `load(base_model, run_dir)`   the trained model, eval mode
  `to_lora(run_dir, **opts)`    a plain peft LoRA adapter (config + tensors) for `rankwise export`
  `discovered_ranks(run_dir)`   per-layer ranks the run found (for `rankwise plan --from-run`)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..types import RankwiseError

__all__ = ["Built", "Method", "MethodContext", "PlainLora", "register_method", "get_method", "list_methods",
           "method_of_run"]

_REGISTRY: dict[str, "Method"] = {}


@dataclass
class MethodContext:
    """What a method may know about the run it is built for."""

    task: str  # "seq-cls" | "causal-lm"
    model_name: str  # as the user gave it (alias, folder, hub id)
    model_path: str  # the folder actually loaded
    lora_kwargs: dict  # task_type, modules_to_save, lora_dropout, base_model_name_or_path
    choice: dict = field(default_factory=dict)  # plan/strategy/budget/budget_rank/preset/rank/targets/lora_alpha/...
    options: dict = field(default_factory=dict)  # method options (--set for non-lora methods, --ranks, ...)
    progress: bool = True
    seed: int = 0
    train_dataset: Any = None  # encoded training split (calibration for data-driven strategies)
    collate: Any = None  # the Trainer's data collator for that split
    data: str | None = None  # the --data the run trains on (recorded with a calibration)
    total_steps: int | None = None  # optimizer steps of the run, known before callbacks() is called
    # QLoRA (--quantize): the base model's linear weights are quantised; plans measure this full-precision
    # checkpoint folder instead (None: the base model itself is full precision)
    plan_source: str | None = None


@dataclass
class Built:
    model: Any  # the adapted model (a PeftModel or a model with the same everyday methods)
    plan: Any = None  # a Plan (written as plan.json) or None
    lora_params: int = 0  # trainable adapter parameters spent (the budget's unit), head excluded
    info: dict = field(default_factory=dict)  # results.json run_info["adapter"] additions
    state: dict = field(default_factory=dict)  # method-private (e.g. the AdaLoRA stepper)


@dataclass
class PlainLora:
    """A plain peft LoRA adapter in memory: `config` a peft LoraConfig, `tensors` keyed as peft saves them
    (`base_model.model.<module>.lora_A.weight`, modules_to_save entries included)."""

    config: Any
    tensors: dict


class Method:
    name: str = ""
    description: str = ""
    supports_quantization: bool = False  # can build on a bitsandbytes-quantised base model (rankwise train --quantize)

    def check(self, options: dict, choice: dict) -> None:
        """Validate method options (and the adapter choice: budget, budget_rank, targets, ...) before any model
        loads."""
        if options:
            raise RankwiseError(f"method {self.name!r} takes no options, got {sorted(options)}")

    def build(self, base_model, ctx: MethodContext) -> Built:  # pragma: no cover - abstract
        raise NotImplementedError

    def callbacks(self, built: Built, ctx: MethodContext) -> list:
        return []

    def finish(self, built: Built, ctx: MethodContext, run_dir: Path) -> dict:
        return {}

    def save(self, built: Built, run_dir: Path) -> None:
        built.model.save_pretrained(str(run_dir))

    def load(self, base_model, run_dir: str | os.PathLike):  # pragma: no cover - abstract
        raise NotImplementedError

    def to_lora(self, run_dir: str | os.PathLike, **opts) -> PlainLora:  # pragma: no cover - abstract
        raise NotImplementedError

    def discovered_ranks(self, run_dir: str | os.PathLike) -> dict[str, int]:
        raise RankwiseError(f"runs of method {self.name!r} discover no ranks; --from-run takes multirank or "
                            "adalora runs")


def register_method(method: Method) -> Method:
    if not method.name:
        raise ValueError("a method needs a name")
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RankwiseError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}") from None


def list_methods() -> list[Method]:
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def method_of_run(run_dir: str | os.PathLike) -> Method:
    """The method that trained a run folder (task.json's "method"; runs from before methods existed are lora)."""
    p = Path(run_dir) / "task.json"
    if not p.is_file():
        raise RankwiseError(f"{run_dir} is not a rankwise run folder (no task.json); give the --out of "
                            "`rankwise train`")
    try:
        name = json.loads(p.read_text()).get("method", "lora")
    except (json.JSONDecodeError, AttributeError) as e:
        raise RankwiseError(f"{p} is corrupt ({e}); re-run `rankwise train`") from None
    return get_method(name)
