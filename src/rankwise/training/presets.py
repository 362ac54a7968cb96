"""Adapter choice -> a Plan, always: presets and `--rank` are uniform plans, so every run has a plan.json.

Presets name the same intent on every family: efficient (r=4, query/value), balanced (r=8, all attention
projections), expressive (r=16, attention + feed-forward). The QLoRA presets qlora_memory (r=4, query/value) and
qlora_quality (r=8, all attention projections) imply a 4-bit base model (`PRESET_QUANTIZE`).
"""

from __future__ import annotations

import os
from typing import Sequence

from ..plan import Plan, make_plan
from ..targets import resolve_targets
from ..types import LayerStats, RankwiseError

__all__ = ["PRESETS", "PRESET_RANKS", "PRESET_QUANTIZE", "FAMILIES", "family_of", "preset_targets", "build_plan", "check_choice"]

PRESETS = ("efficient", "balanced", "expressive", "qlora_memory", "qlora_quality")
PRESET_RANKS = {"efficient": 4, "balanced": 8, "expressive": 16, "qlora_memory": 4, "qlora_quality": 8}
# QLoRA presets: the adapter of efficient / balanced on a base model loaded in 4 bits (unless --quantize says else)
PRESET_QUANTIZE = {"qlora_memory": "4bit", "qlora_quality": "4bit"}
_SAME_TARGETS = {"qlora_memory": "efficient", "qlora_quality": "balanced"}
# model_type -> family; the family's module names per preset (suffixes, matched as peft matches a list).
FAMILIES = {
    "bert": ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie"),
    "llama": ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2", "gemma3_text",
              "olmo", "olmo2", "smollm3"),
    "gpt2": ("gpt2",),
}
_TARGETS = {
    "bert": {
        "efficient": ["query", "value"],
        "balanced": ["query", "key", "value", "attention.output.dense"],
        "expressive": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    },
    "llama": {
        "efficient": ["q_proj", "v_proj"],
        "balanced": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "expressive": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "gpt2": {
        "efficient": ["c_attn"],
        "balanced": ["c_attn", "attn.c_proj"],
        "expressive": ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    },
}


def family_of(model_type: str | None) -> str | None:
    return next((fam for fam, types in FAMILIES.items() if model_type in types), None)


def preset_targets(preset: str, model_type: str | None) -> list[str]:
    """Module names for a preset on a model type; an unmapped architecture is an error naming the way out."""
    if preset not in PRESETS:
        raise RankwiseError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    fam = family_of(model_type)
    if fam is None:
        raise RankwiseError(f"preset {preset!r} has no mapping for model type {model_type!r} (mapped: "
                            f"{', '.join(t for ts in FAMILIES.values() for t in ts)}); "
                            "use --rank R --targets NAMES or --strategy S --budget B instead")
    return list(_TARGETS[fam][_SAME_TARGETS.get(preset, preset)])


def build_plan(model, *, model_name: str, plan: Plan | str | os.PathLike | None = None,
               strategy: str | None = None, budget=None, budget_rank: int | None = None,
               preset: str | None = None, rank: int | None = None, targets: str | Sequence[str] | None = None,
               progress: bool = True, calibration=None, measure=None, **hparams) -> tuple[Plan, dict]:
    """Exactly one adapter choice -> (Plan, description for results.json). Nothing given means preset balanced.
    `calibration` (training examples) feeds the data-driven strategies; other choices ignore it.
    `measure`: where a strategy reads weights when `model`'s are quantised (its full-precision checkpoint
    folder); uniform choices need only layer shapes, which quantisation keeps."""
    check_choice(plan=plan, strategy=strategy, budget=budget, budget_rank=budget_rank, preset=preset, rank=rank,
                 targets=targets, hparams=hparams)
    if plan is not None:
        p = plan if isinstance(plan, Plan) else Plan.load(plan)
        return p, {"source": "plan", "plan": None if isinstance(plan, Plan) else str(plan), "strategy": p.strategy}
    if strategy is not None:
        p = make_plan(model if measure is None else measure, strategy, budget, budget_rank=budget_rank,
                      targets=targets, model_name=model_name, progress=progress, calibration=calibration, **hparams)
        return p, {"source": "strategy", "strategy": strategy}
    if rank is not None:
        p = _uniform(model, rank, targets, model_name)
        return p, {"source": "rank", "strategy": "uniform", "rank": rank}
    preset = preset or "balanced"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = preset_targets(preset, model_type)
    p = _uniform(model, PRESET_RANKS[preset], names, model_name)
    return p, {"source": "preset", "preset": preset, "strategy": "uniform", "rank": PRESET_RANKS[preset]}


def _uniform(model, rank: int, targets, model_name: str) -> Plan:
    """Plain LoRA as a plan. Uniform ranks need only layer shapes, so skip the spectral measurement."""
    stats = [LayerStats(info) for info in resolve_targets(model, targets)]
    return make_plan(model, "uniform", budget_rank=rank, targets=targets, stats=stats, model_name=model_name)


def check_choice(*, plan=None, strategy=None, budget=None, budget_rank=None, preset=None, rank=None, targets=None,
                 hparams=None) -> None:
    """Reject conflicting or incomplete adapter flags before any data is read or model loaded."""
    chosen = [k for k, v in (("plan", plan), ("strategy", strategy), ("preset", preset), ("rank", rank))
              if v is not None]
    if len(chosen) > 1:
        raise RankwiseError(f"give one adapter choice, not {' and '.join('--' + c for c in chosen)}: "
                            "--plan DIR | --strategy S --budget B | --preset P | --rank R [--targets ...]")
    if (budget is not None or budget_rank is not None) and strategy is None:
        raise RankwiseError("--budget/--budget-rank need --strategy (e.g. --strategy spectral --budget 300k)")
    if targets is not None and (plan is not None or preset is not None):
        raise RankwiseError("--targets goes with --rank or --strategy, not with --plan or --preset")
    if hparams and strategy is None:
        raise RankwiseError(f"strategy options {sorted(hparams)} need --strategy")
    if strategy is not None and (budget is None) == (budget_rank is None):
        raise RankwiseError("--strategy needs exactly one of --budget (300k, 1.2M, 0.5%) or --budget-rank R")
    if strategy is not None:  # an unknown strategy or a bad --set value fails now, not after the model loads
        from ..allocators import check_strategy

        check_strategy(strategy, hparams)
    if rank is not None and rank < 1:
        raise RankwiseError(f"--rank must be >= 1, got {rank}")
    if preset is not None:
        preset_targets(preset, "bert")  # an unknown preset name fails here; the family is checked on the model
    if plan is not None and not isinstance(plan, Plan):
        Plan.load(plan)  # a missing or broken plan.json fails now, not after tokenizing
