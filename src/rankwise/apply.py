"""Put a Plan on a model with peft, then prove it: every adapted layer's real rank and alpha must equal the plan."""

from __future__ import annotations

import sys

from torch import nn

from .plan import Plan
from .targets import adaptable_layers, match_names, select_layers
from .types import RankwiseError

__all__ = ["apply", "verify", "lora_layers", "verify_on_skeleton", "check_plan_fits"]


def lora_layers(peft_model, adapter_name: str = "default") -> dict[str, tuple[int, float, int]]:
    """{module name in the base model: (rank, lora_alpha, LoRA parameter count)} for every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    found = {}
    for name, mod in base.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in mod.r:
            a, b = mod.lora_A[adapter_name], mod.lora_B[adapter_name]
            n = sum(p.numel() for p in a.parameters()) + sum(p.numel() for p in b.parameters())
            found[name] = (int(mod.r[adapter_name]), float(mod.lora_alpha[adapter_name]), n)
    return found


def verify(peft_model, plan: Plan, *, lora_alpha: float | None = None, adapter_name: str = "default") -> int:
    """Raise RankwiseError unless the model's LoRA layers are exactly the plan's (names, ranks, alphas, sizes).

    Returns the number of LoRA parameters, which equals `plan.spent`."""
    real = lora_layers(peft_model, adapter_name)
    mapping = match_names([r.name for r in plan.adapted], list(real))
    problems = []
    for row in plan.adapted:
        r, a, n = real[mapping[row.name]]
        want_alpha = float(lora_alpha if lora_alpha is not None else row.alpha)
        if r != row.rank or abs(a - want_alpha) > 1e-9 or n != row.params:
            problems.append(f"{row.name}: plan r={row.rank} alpha={want_alpha:g} params={row.params}, "
                            f"model r={r} alpha={a:g} params={n}")
    extra = sorted(set(real) - set(mapping.values()))
    if extra:
        problems.append(f"layers adapted but not in the plan: {extra[:3]}")
    if problems:
        raise RankwiseError("peft did not apply the plan as written: " + "; ".join(problems[:3]))
    return sum(n for _, _, n in real.values())


def apply(model: nn.Module, plan: Plan, *, lora_alpha: float | None = None, adapter_name: str = "default",
          **lora_kwargs):
    """`get_peft_model(model, plan.to_lora_config(...))`, then `verify`. Returns the PeftModel.

    The plan's names may lack a wrapper prefix (a plan made on `BertModel` applies to
    `BertForSequenceClassification`, whose layers live under `bert.`); they are resolved to this model's fully
    qualified names first, so the config written with the adapter names this model's modules exactly."""
    from peft import get_peft_model

    for note in check_plan_fits(model, plan):
        print(f"warning: {note}", file=sys.stderr)
    names = [lay.name for lay in adaptable_layers(model)]
    mapping = match_names([r.name for r in plan.adapted], names)
    config = plan.to_lora_config(lora_alpha=lora_alpha, name_map=mapping, **lora_kwargs)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    verify(peft_model, plan, lora_alpha=lora_alpha, adapter_name=adapter_name)
    return peft_model


def check_plan_fits(model: nn.Module, plan: Plan) -> list[str]:
    """Check a plan against the model it is applied to; return the differences that still allow it.

    An error (RankwiseError) when a planned layer is missing or has another shape: the ranks were computed from
    other weights. Differences that leave every planned layer in place with its shape (another model type, target
    layers the plan does not list, unadapted plan rows the model lacks) come back as one-line notes."""
    found = {lay.name: lay for lay in adaptable_layers(model)}
    mapping = match_names([r.name for r in plan.adapted], list(found))  # raises naming missing layers
    for row in plan.adapted:
        have = list(found[mapping[row.name]].shape)
        if have != list(row.shape):
            raise RankwiseError(f"the plan was made for another model: layer {row.name} is {_shape(row.shape)} in "
                                f"the plan but {_shape(have)} in this model; re-run `rankwise plan` on this model")
    notes = []
    fp = plan.fingerprint or {}
    mine = getattr(getattr(model, "config", None), "model_type", None)
    if fp.get("model_type") and mine and fp["model_type"] != mine:
        notes.append(f"the plan was made on a {fp['model_type']!r} model, this is {mine!r}; every planned layer "
                     "exists here with its shape, so the plan applies as written")
    planned = {r.name for r in plan.layers}
    absent = [r.name for r in plan.layers if r.rank == 0 and not any(
        n == r.name or n.endswith("." + r.name) for n in found)]
    try:
        targets = select_layers(list(found.values()), plan.targets)
    except RankwiseError:
        targets = []  # a regex written for the plan's model names: nothing to compare against
    extra = [lay.name for lay in targets if not any(lay.name == p or lay.name.endswith("." + p) for p in planned)]
    if extra:
        notes.append(f"this model has {len(extra)} target layer(s) the plan does not list (e.g. {extra[0]}); "
                     "they stay without LoRA")
    if absent:
        notes.append(f"{len(absent)} unadapted plan layer(s) are not in this model (e.g. {absent[0]})")
    return notes


def _shape(shape) -> str:
    return "x".join(str(int(x)) for x in shape)


def verify_on_skeleton(model_path, plan: Plan) -> bool:
    """Round-trip `plan` through peft on a weightless (meta-device) copy of the model at `model_path`.

    Costs no weight memory, so `rankwise plan` can prove its config on any size of model. Returns False (and checks
    nothing) when the folder has no config.json to build the architecture from."""
    import torch
    from pathlib import Path

    if not (Path(model_path) / "config.json").is_file():
        return False
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(model_path))
    with torch.device("meta"):
        skeleton = AutoModel.from_config(config)
    apply(skeleton, plan)
    return True
