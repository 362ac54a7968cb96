"""Put a Plan on a model with peft, then prove it: every adapted layer's real rank and alpha must equal the plan."""

from __future__ import annotations

from torch import nn

from .plan import Plan
from .targets import adaptable_layers, match_names
from .types import RankwiseError

__all__ = ["apply", "verify", "lora_layers", "verify_on_skeleton"]


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

    names = [lay.name for lay in adaptable_layers(model)]
    mapping = match_names([r.name for r in plan.adapted], names)
    config = plan.to_lora_config(lora_alpha=lora_alpha, name_map=mapping, **lora_kwargs)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    verify(peft_model, plan, lora_alpha=lora_alpha, adapter_name=adapter_name)
    return peft_model


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
