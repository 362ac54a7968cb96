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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise RankwiseError(f"{folder} has no adapter_model.safetensors (deleted or never written); "
                            "re-run `rankwise train` for this folder")
    try:
        config = LoraConfig.from_pretrained(str(folder))
        tensors = load_file(str(weights))
    except (OSError, ValueError, json.JSONDecodeError, TypeError, SafetensorError) as e:
        raise RankwiseError(f"{folder} holds a corrupt adapter ({str(e).splitlines()[0][:160]})") from None
    return PlainLora(config, tensors)


def _calibration(strategy, ctx: MethodContext, samples):
    """A data-driven strategy calibrates on the training split the run trains on (other strategies skip it)."""
    from ..allocators.data import is_data_driven

    if strategy is None or not is_data_driven(strategy):
        if samples is not None:
            raise RankwiseError("--calib-samples goes with a data-driven --strategy (activation, gradient, eva)")
        return None
    if ctx.train_dataset is None or ctx.collate is None:
        raise RankwiseError(f"strategy {strategy!r} allocates from data statistics: give --data D")
    import torch

    from ..stats.calibration import Calibration

    return Calibration(ctx.train_dataset, ctx.collate, data=ctx.data, samples=256 if samples is None else samples,
                       seed=ctx.seed, task=ctx.task, device="cuda" if torch.cuda.is_available() else None)


class LoraMethod(Method):
    name = "lora"
    description = "peft LoRA with a rankwise plan (static ranks per layer)"
    supports_quantization = True

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
        calibration = _calibration(c.get("strategy"), ctx, c.pop("calib_samples", None))
        # quantised base (QLoRA): weight-based strategies measure the full-precision checkpoint instead
        measure = ctx.plan_source if calibration is None else None
        plan, adapter = build_plan(base_model, model_name=ctx.model_name, progress=ctx.progress,
                                   calibration=calibration, measure=measure, **c, **hparams)
        model = apply(base_model, plan, lora_alpha=lora_alpha, use_dora=dora, use_rslora=rslora, **ctx.lora_kwargs)
        return Built(model=model, plan=plan, lora_params=plan.spent, info=adapter)

    def load(self, base_model, run_dir):
        from peft import PeftModel
        from safetensors import SafetensorError

        folder = Path(run_dir)
        if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            # peft would fall back to the hub and point at its cache: the real problem is this folder
            raise RankwiseError(f"{folder} has no adapter_model.safetensors (deleted or never written); "
                                "re-run `rankwise train` for this folder")
        try:
            return PeftModel.from_pretrained(base_model, str(folder))
        except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise RankwiseError(f"{folder} holds a corrupt adapter (adapter_config.json or weights: {first}); "
                                "re-run `rankwise train` for this folder") from None

    def to_lora(self, run_dir, **opts) -> PlainLora:
        if opts.get("rank") is not None or opts.get("energy") is not None:
            from .plain import compress_lora

            return compress_lora(read_peft_adapter(run_dir), rank=opts.get("rank"), energy=opts.get("energy"))
        return read_peft_adapter(run_dir)


register_method(LoraMethod())
