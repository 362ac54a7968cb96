"""`rankwise train --method adalora`: AdaLoRA on peft's SVD layers, driven by rankwise's own allocator.

peft supplies the layers (`SVDLinear`: W + B diag(E) A * alpha / init_r), the adapter files and the reload of a
pruned rank pattern; rankwise supplies everything peft leaves to the caller or gets wrong for this use:
- the allocation step runs from a Trainer callback (peft's `update_and_allocate` is never called by `Trainer`),
  vectorised over layers, with budgets in trainable parameters by default (`unit=params`) or peft's ranks;
- `finish` refuses a run whose allocator never ran or never reached its final allocation (peft would save a plain
  SVD-LoRA at init_r without a word);
- the orthogonal penalty is added in training only (peft also adds it to evaluation losses);
- `to_lora` folds lambda and the scaling into a plain peft LoRA adapter (peft's convert_to_lora refuses SVDLinear).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..methods.base import Built, Method, MethodContext, PlainLora, register_method
from ..types import RankwiseError
from .schedule import SHAPES, default_schedule
from .stepper import UNITS, Slot, Stepper

__all__ = ["AdaLoraMethod", "AdaOptions", "parse_options", "default_init_rank", "adalora_to_plain"]

_ADAPTER = "default"
DEFAULT_BUDGET_RANK = 8  # peft's target_r default
# The AdaLoRA authors' GLUE scripts (QingruZhang/AdaLoRA, NLU/scripts/run_debertav3_*.sh): target_rank 1 with
# lora_r 2 on six of eight tasks (3 on CoLA and MNLI), lora_alpha 16 or 32, so alpha / init_r (peft's and their
# scaling) is 8 to 16, and reg_orth_coef 0.1 (0.3 on STS-B and RTE). docs/adalora.md records the measurement.
_INIT_FACTOR = 2.0  # initial budget b(0) = 2 x the final budget b(T) (lora_r / target_rank in the scripts)
DEFAULT_SCALE = 16.0  # alpha / init_rank: 32 / 2 in the scripts for STS-B, RTE, MRPC, QNLI (16 / 2 on SST-2, QQP)


@dataclass
class AdaOptions:
    """`--set KEY=VALUE` options of method adalora (None: the schedule default for the run's length)."""

    tinit: int | None = None
    tfinal: int | None = None
    deltaT: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    scale: float = DEFAULT_SCALE
    init_rank: int | None = None
    schedule: str = "cubic"
    unit: str = "params"
    fill: bool = True  # parameter units: a wide triplet that no longer fits does not stop cheaper ones after it


_INTS = ("tinit", "tfinal", "deltaT", "init_rank")
_FLOATS = ("beta1", "beta2", "orth_reg_weight", "scale")


def parse_options(options: dict) -> AdaOptions:
    """Validate `--set` options: known names, right types and ranges, each error one line."""
    opts = dict(options or {})
    if "init_r" in opts:  # peft's name for it
        opts["init_rank"] = opts.pop("init_r")
    allowed = list(AdaOptions.__dataclass_fields__)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise RankwiseError(f"unknown adalora option(s) {unknown}; allowed: {', '.join(allowed)}")
    if "fill" in opts and not isinstance(opts["fill"], bool):
        raise RankwiseError(f"adalora option fill must be true or false, got {opts['fill']!r}")
    for k in _INTS:
        if k in opts and (isinstance(opts[k], bool) or not isinstance(opts[k], int)):
            raise RankwiseError(f"adalora option {k} must be an integer, got {opts[k]!r}")
    for k in _FLOATS:
        if k in opts and (isinstance(opts[k], bool) or not isinstance(opts[k], (int, float))):
            raise RankwiseError(f"adalora option {k} must be a number, got {opts[k]!r}")
        opts[k] = float(opts[k]) if k in opts else getattr(AdaOptions, k)
    o = AdaOptions(**opts)
    for k in ("beta1", "beta2"):
        if not 0 < getattr(o, k) < 1:
            raise RankwiseError(f"adalora {k} must be in (0, 1), got {getattr(o, k)}")
    if o.orth_reg_weight < 0:
        raise RankwiseError(f"adalora orth_reg_weight must be >= 0, got {o.orth_reg_weight}")
    if not o.scale > 0:
        raise RankwiseError(f"adalora scale (lora_alpha / init_rank) must be > 0, got {o.scale}")
    if o.init_rank is not None and o.init_rank < 1:
        raise RankwiseError(f"adalora init_rank must be >= 1, got {o.init_rank}")
    if o.schedule not in SHAPES:
        raise RankwiseError(f"adalora schedule must be one of {', '.join(SHAPES)}, got {o.schedule!r}")
    if o.unit not in UNITS:
        raise RankwiseError(f"adalora unit must be one of {', '.join(UNITS)}, got {o.unit!r}")
    for k in ("tinit", "tfinal", "deltaT"):
        if getattr(o, k) is not None and getattr(o, k) < (1 if k == "deltaT" else 0):
            raise RankwiseError(f"adalora {k} must be >= {1 if k == 'deltaT' else 0}, got {getattr(o, k)}")
    return o


def default_init_rank(target_rank: float) -> int:
    """2 x the final average rank (the authors' GLUE scripts start at lora_r = 2 x target_rank), and at least one
    rank above it so that even a rank-1 budget leaves the allocator something to move."""
    return max(math.ceil(_INIT_FACTOR * target_rank - 1e-9), math.floor(target_rank) + 1)


def _check_choice(choice: dict, o: AdaOptions) -> None:
    given = [f"--{k.replace('_', '-')}" for k in ("plan", "strategy", "preset", "rank") if choice.get(k) is not None]
    if given or choice.get("strategy_options"):
        raise RankwiseError(f"method adalora takes --budget or --budget-rank (the final budget) and --targets, not "
                            f"{', '.join(given) or 'strategy options'}")
    if choice.get("budget") is not None and choice.get("budget_rank") is not None:
        raise RankwiseError("give one of --budget and --budget-rank, not both")
    if o.unit == "ranks" and choice.get("budget") is not None:
        raise RankwiseError("adalora unit=ranks counts ranks (peft's target_r): give --budget-rank R, not --budget")
    br = choice.get("budget_rank")
    if br is not None and (isinstance(br, bool) or not isinstance(br, int) or br < 1):
        raise RankwiseError(f"--budget-rank must be a positive integer, got {br!r}")
    if o.init_rank is not None and br is not None and o.init_rank < br:
        raise RankwiseError(f"adalora init_rank ({o.init_rank}) must be >= the target rank (--budget-rank {br})")
    if choice.get("dora") or choice.get("rslora"):
        raise RankwiseError("adalora supports neither --dora nor --rslora (its scaling is alpha / init_rank)")


@contextmanager
def _quiet_peft():
    """peft warns, wrongly for AdaLoRA, that a pruned rank-0 layer's (0, in) tensors are unsharded ZeRO-3 leftovers,
    and on reload that rank_pattern's `.lora_E` keys match no module (they are AdaLoRA's, not LoRA's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
        warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
        yield


def _skip_peft_penalty(peft_model) -> None:
    """Route AdaLoraModel's forward straight to the wrapped model (what its forward does, minus the orthogonal
    penalty it adds to every loss, evaluation included, by walking every parameter name). rankwise adds the
    penalty itself, in training only (`OrthRegulariser`)."""
    tuner = peft_model.base_model
    tuner.forward = tuner.model.forward


def _slots(peft_model) -> list[Slot]:
    from peft.tuners.adalora import AdaLoraLayer

    return [Slot(name, m.lora_A[_ADAPTER], m.lora_E[_ADAPTER], m.lora_B[_ADAPTER])
            for name, m in peft_model.base_model.model.named_modules()
            if isinstance(m, AdaLoraLayer) and _ADAPTER in m.lora_A]


class AdaLoraMethod(Method):
    name = "adalora"
    description = "AdaLoRA: SVD-style triplets pruned during training to a parameter (or rank) budget"

    def check(self, options: dict, choice: dict) -> None:
        _check_choice(choice, parse_options(options))

    def build(self, base_model, ctx: MethodContext) -> Built:
        from peft import AdaLoraConfig, get_peft_model

        from ..allocators.budget import parse_budget
        from ..plan import count_params
        from ..targets import resolve_targets
        from .callback import OrthRegulariser

        o = parse_options(ctx.options)
        c = ctx.choice
        _check_choice(c, o)
        layers = resolve_targets(base_model, c.get("targets"))
        br = c.get("budget_rank")
        if c.get("budget") is None and br is None:
            br = DEFAULT_BUDGET_RANK
        budget = parse_budget(c.get("budget"), layers, total_params=count_params(base_model), budget_rank=br)
        # one rank of every layer, lambda included unless the unit counts the exported LoRA's parameters
        cost = sum(lay.params_per_rank + (o.unit == "params") for lay in layers)
        avg = br if o.unit == "ranks" else budget.params / cost
        init = o.init_rank or default_init_rank(avg)
        too_small = [lay.name for lay in layers if lay.max_rank < init]
        if too_small:
            raise RankwiseError(f"adalora init_rank {init} exceeds min(in, out) of {too_small[0]} (and "
                                f"{len(too_small) - 1} more); lower init_rank or the budget")
        target = br * len(layers) if o.unit == "ranks" else budget.params
        alpha = c.get("lora_alpha") or o.scale * init  # --lora-alpha wins over the scale option
        config = AdaLoraConfig(
            init_r=init, target_r=max(1, round(avg)), total_step=ctx.total_steps or 1, tinit=0, tfinal=0,
            deltaT=1, beta1=o.beta1, beta2=o.beta2, orth_reg_weight=o.orth_reg_weight, lora_alpha=alpha,
            target_modules=[lay.name for lay in layers], **ctx.lora_kwargs)
        model = get_peft_model(base_model, config)
        slots = _slots(model)
        if sorted(s.name for s in slots) != sorted(lay.name for lay in layers) or any(s.rank != init for s in slots):
            raise RankwiseError(f"peft built {len(slots)} AdaLoRA layers for {len(layers)} targets; expected each "
                                f"at rank {init}")
        stepper = Stepper(slots, target=target, unit=o.unit, beta1=o.beta1, beta2=o.beta2, fill=o.fill)
        _skip_peft_penalty(model)
        reg = OrthRegulariser([s.A for s in slots], [s.B for s in slots], o.orth_reg_weight)
        model.register_forward_hook(reg.hook)
        info = {"source": "adalora", "strategy": "adalora", "budget": budget.to_dict(), "unit": o.unit, "fill": o.fill,
                "init_rank": init, "lora_alpha": alpha, "layers_adapted": len(layers)}
        return Built(model=model, plan=None, lora_params=stepper.peak_params(), info=info,
                     state={"stepper": stepper, "options": o, "budget": budget, "regulariser": reg})

    def callbacks(self, built: Built, ctx: MethodContext) -> list:
        from .callback import AllocationCallback, PenaltyLog

        o: AdaOptions = built.state["options"]
        stepper: Stepper = built.state["stepper"]

        def make(total: int):
            return default_schedule(total, tinit=o.tinit, tfinal=o.tfinal, deltaT=o.deltaT, shape=o.schedule)

        stepper.bind(make(ctx.total_steps))  # a schedule that cannot work fails here, before the first step
        return [AllocationCallback(stepper, make), PenaltyLog(built.state["regulariser"])]

    def finish(self, built: Built, ctx: MethodContext, run_dir: Path) -> dict:
        from .report import write_reports

        stepper: Stepper = built.state["stepper"]
        s = stepper.schedule
        if stepper.steps_run == 0:
            raise RankwiseError("adalora's allocation step never ran (its Trainer callback was removed, or training "
                                "ran outside Trainer): the result would be a plain SVD-LoRA at init_rank; not saved")
        if not stepper.finalized:
            raise RankwiseError(f"adalora stopped at step {stepper.last_step}, before its final allocation at step "
                                f"{s.final_step} of {s.total_step}: the ranks never reached the budget; not saved")
        config = built.model.peft_config[_ADAPTER]
        config.rank_pattern = stepper.rank_pattern()
        config.total_step, config.tinit, config.tfinal, config.deltaT = s.total_step, s.tinit, s.tfinal, s.deltaT
        info = write_reports(stepper, built.state["budget"], built.state["options"], run_dir)
        # train_loss is the task loss; the penalty it was trained with is reported apart (run.py merges this)
        info["train_info"] = {"orth_penalty": built.state["regulariser"].mean_total()}
        return info

    def save(self, built: Built, run_dir: Path) -> None:
        if built.model.peft_config[_ADAPTER].rank_pattern is None:
            raise RankwiseError("adalora has no final rank pattern (finish() never ran); refusing to save a plain "
                                "SVD-LoRA")
        with _quiet_peft():
            built.model.save_pretrained(str(run_dir))

    def load(self, base_model, run_dir):
        from peft import PeftModel

        with _quiet_peft():
            model = PeftModel.from_pretrained(base_model, str(run_dir))
        _skip_peft_penalty(model)
        return model

    def to_lora(self, run_dir, **opts) -> PlainLora:
        plain = adalora_to_plain(run_dir)
        if opts.get("rank") is not None or opts.get("energy") is not None:
            from ..methods.plain import compress_lora

            return compress_lora(plain, rank=opts.get("rank"), energy=opts.get("energy"))
        return plain

    def discovered_ranks(self, run_dir) -> dict[str, int]:
        from .report import read_ranks

        return read_ranks(run_dir)


def adalora_to_plain(folder: str | os.PathLike) -> PlainLora:
    """A saved AdaLoRA adapter as an exactly equivalent plain LoRA: per layer the triplets with lambda != 0,
    A' = (A * lambda)[keep], B' = B[:, keep] * alpha / (init_r + 1e-5) (peft's SVDLinear scaling; ranknum is
    init_r and is not saved), rank = alpha = number kept. Rank-0 layers are left out of the targets."""
    import torch
    from peft import AdaLoraConfig
    from safetensors.torch import load_file

    from ..methods.plain import plain_from_deltas

    folder = Path(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise RankwiseError(f"{folder} has no adapter_model.safetensors; re-run `rankwise train` for this folder")
    try:
        config = AdaLoraConfig.from_pretrained(str(folder))
        tensors = load_file(str(weights))
    except (OSError, ValueError, json.JSONDecodeError, TypeError) as e:
        raise RankwiseError(f"{folder} holds a corrupt AdaLoRA adapter ({str(e).splitlines()[0][:160]})") from None
    ranknum = torch.tensor(float(config.init_r)) + 1e-5  # float32, as the layer holds it
    deltas, extra = {}, {}
    for key, t in tensors.items():
        if key.endswith(".lora_E"):
            prefix = key[: -len(".lora_E")]
            e = t.reshape(-1)
            keep = e != 0
            a = (tensors[prefix + ".lora_A"] * t)[keep]
            b = tensors[prefix + ".lora_B"][:, keep] * config.lora_alpha / ranknum
            deltas[prefix.removeprefix("base_model.model.")] = (a, b)
        elif not key.endswith((".lora_A", ".lora_B")):
            extra[key] = t
    return plain_from_deltas(config, deltas, extra)


register_method(AdaLoraMethod())
