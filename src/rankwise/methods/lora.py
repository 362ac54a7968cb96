"""Plain LoRA with a rankwise plan (strategy + budget, preset, rank, or a plan folder): peft is the runtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..types import RankwiseError
from .base import Built, Method, MethodContext, PlainLora, register_method

__all__ = ["LoraMethod", "read_peft_adapter"]

_CHOICE = ("plan", "strategy", "budget", "budget_rank", "preset", "rank", "targets")


def read_peft_adapter(folder: str | os.PathLike) -> PlainLora:
    """A saved peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors) as a PlainLora."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise RankwiseError(f"{folder} has no adapter_model.safetensors (deleted or never written); "
                            "re-run `rankwise train` for this folder")
    try:
        config = LoraConfig.from_pretrained(str(folder))
        tensors = load_file(str(weights))
    except (OSError, ValueError, json.JSONDecodeError, TypeError) as e:
        raise RankwiseError(f"{folder} holds a corrupt adapter ({str(e).splitlines()[0][:160]})") from None
    return PlainLora(config, tensors)


class LoraMethod(Method):
    name = "lora"
    description = "peft LoRA with a rankwise plan (static ranks per layer)"

    def check(self, options: dict, choice: dict) -> None:
        from ..training.presets import check_choice

        check_choice(**{k: v for k, v in choice.items() if k in _CHOICE}, hparams=choice.get("strategy_options"))
        if options:
            raise RankwiseError(f"method 'lora' takes strategy options through --set, not method options "
                                f"{sorted(options)}")

    def build(self, base_model, ctx: MethodContext) -> Built:
        from ..apply import apply
        from ..training.presets import build_plan

        c = dict(ctx.choice)
        lora_alpha, dora, rslora = c.pop("lora_alpha", None), c.pop("dora", False), c.pop("rslora", False)
        hparams = c.pop("strategy_options", None) or {}
        plan, adapter = build_plan(base_model, model_name=ctx.model_name, progress=ctx.progress, **c, **hparams)
        model = apply(base_model, plan, lora_alpha=lora_alpha, use_dora=dora, use_rslora=rslora, **ctx.lora_kwargs)
        return Built(model=model, plan=plan, lora_params=plan.spent, info=adapter)

    def load(self, base_model, run_dir):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(run_dir))

    def to_lora(self, run_dir, **opts) -> PlainLora:
        if opts.get("rank") is not None or opts.get("energy") is not None:
            from ..exporting import compress_lora

            return compress_lora(read_peft_adapter(run_dir), rank=opts.get("rank"), energy=opts.get("energy"))
        return read_peft_adapter(run_dir)


register_method(LoraMethod())
