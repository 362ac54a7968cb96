"""peft's own EVA initialisation as a training method (`rankwise train --method peft_eva --budget-rank R`).

EVA (Explained Variance Adaptation) initialises each LoRA A with the top right-singular vectors of the layer's
input activations on a calibration sample, and redistributes ranks across layers by explained variance, up to
`rho * r` per layer. peft budgets this in *rank sums* (sum of ranks stays `r * layers`), so moving rank between
layers of different shapes changes the parameter count: this method records the parameters EVA really spent
(`lora_params`, and a plan.json with the final ranks), and `rankwise report` refuses comparisons outside its
budget tolerance. It is the baseline for rankwise's own `eva` allocator, which budgets in parameters.
"""

from __future__ import annotations

from ..types import Budget, RankwiseError
from .base import Built, MethodContext, register_method
from .lora import LoraMethod

__all__ = ["PeftEvaMethod"]

_OPTIONS = {"rho": 2.0, "tau": 0.99, "whiten": False, "adjust_scaling_factors": True, "calib_samples": 256,
            "calib_batch_size": 16}
_NOT_WITH = ("plan", "strategy", "preset", "budget")


class PeftEvaMethod(LoraMethod):
    name = "peft_eva"
    description = "peft's EVA: LoRA A from the SVD of layer inputs, ranks redistributed in rank sums (rho)"

    def check(self, options: dict, choice: dict) -> None:
        bad = sorted(set(options) - set(_OPTIONS))
        if bad:
            raise RankwiseError(f"method 'peft_eva' has no option {bad[0]!r}; allowed: "
                                + ", ".join(f"{k}={v!r}" for k, v in _OPTIONS.items()))
        opts = {**_OPTIONS, **options}
        if not isinstance(opts["rho"], (int, float)) or opts["rho"] < 1:
            raise RankwiseError(f"peft_eva: rho must be a number >= 1 (1 = no redistribution), got {opts['rho']!r}")
        if not isinstance(opts["tau"], (int, float)) or not 0 <= opts["tau"] <= 1:
            raise RankwiseError(f"peft_eva: tau must be in [0, 1], got {opts['tau']!r}")
        for k in ("calib_samples", "calib_batch_size"):
            if isinstance(opts[k], bool) or not isinstance(opts[k], int) or opts[k] < 1:
                raise RankwiseError(f"peft_eva: {k} must be a positive integer, got {opts[k]!r}")
        given = [k for k in _NOT_WITH if choice.get(k) is not None]
        if given:
            raise RankwiseError(f"--method peft_eva takes --budget-rank R (or --rank R) and --targets, not "
                                f"--{given[0].replace('_', '-')} (EVA budgets a rank sum: r per layer on average)")
        if (choice.get("rank") is None) == (choice.get("budget_rank") is None):
            raise RankwiseError("--method peft_eva needs one of --budget-rank R or --rank R (R: the average rank)")
        r = choice.get("rank") or choice.get("budget_rank")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise RankwiseError(f"peft_eva: the rank must be a positive integer, got {r!r}")

    def build(self, base_model, ctx: MethodContext) -> Built:
        from peft import EvaConfig, LoraConfig, get_peft_model
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        from ..apply import lora_layers
        from ..targets import resolve_targets

        opts = {**_OPTIONS, **ctx.options}
        c = ctx.choice
        r = int(c.get("rank") or c.get("budget_rank"))
        layers = resolve_targets(base_model, c.get("targets"))
        if ctx.train_dataset is None or len(ctx.train_dataset) == 0:
            raise RankwiseError("peft_eva needs training data to calibrate on")
        alpha = float(c["lora_alpha"]) if c.get("lora_alpha") is not None else 2.0 * r
        config = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=[lay.name for lay in layers], init_lora_weights="eva",
            eva_config=EvaConfig(rho=float(opts["rho"]), tau=float(opts["tau"]), whiten=bool(opts["whiten"]),
                                 adjust_scaling_factors=bool(opts["adjust_scaling_factors"])),
            use_rslora=bool(c.get("rslora")), use_dora=bool(c.get("dora")), **ctx.lora_kwargs)
        model = get_peft_model(base_model, config)
        loader = self._loader(ctx, opts)
        kwargs = {"show_progress_bar": ctx.progress}
        if ctx.task == "seq-cls":  # labels are one class per example, not a token mask: use the attention mask
            separate = getattr(base_model, "rankwise_pair_encoding", None) == "separate"
            kwargs["prepare_model_inputs_fn"] = _pair_positions if separate else _attention_positions
        try:
            initialize_lora_eva_weights(model, dataloader=loader, **kwargs)
        except ValueError as e:
            raise RankwiseError(f"peft EVA initialisation failed: {str(e).splitlines()[0][:200]}") from None
        model.peft_config["default"].init_lora_weights = True  # the saved adapter is plain LoRA: weights hold EVA
        real = lora_layers(model)
        plan = _plan(layers, real, r, model_name=ctx.model_name, opts=opts)
        return Built(model=model, plan=plan, lora_params=plan.spent,
                     info={"source": "method", "strategy": "peft_eva", "rank": r,
                           "eva": {k: opts[k] for k in ("rho", "tau", "whiten", "adjust_scaling_factors")},
                           "calib_samples": len(loader.dataset)})

    @staticmethod
    def _loader(ctx: MethodContext, opts: dict):
        import torch
        from torch.utils.data import DataLoader, Subset

        n = min(int(opts["calib_samples"]), len(ctx.train_dataset))
        g = torch.Generator().manual_seed(ctx.seed)
        idx = torch.randperm(len(ctx.train_dataset), generator=g)[:n].tolist()
        return DataLoader(Subset(ctx.train_dataset, idx), batch_size=int(opts["calib_batch_size"]),
                          collate_fn=ctx.collate)


def _attention_positions(model_input, peft_config):
    """Token positions EVA may use for a classification batch: every non-padding token."""
    import torch

    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    return mask.nonzero()


def _pair_positions(model_input, peft_config):
    """--pair-encoding separate: the layers see each sentence as its own row (training/pairs.py), so EVA's token
    positions are those of the split batch, not of the joint rows the data loader yields."""
    from ..training.pairs import split_pairs

    _, mask = split_pairs(model_input["input_ids"], model_input["attention_mask"], model_input["token_type_ids"])
    return mask.bool().nonzero()


def _plan(layers, real: dict, r: int, *, model_name: str, opts: dict):
    """The ranks EVA chose as a rankwise Plan (plan.json): layers EVA pruned to rank 0 keep a row with rank 0."""
    from ..plan import Plan, PlanRow

    rows = []
    for lay in layers:
        hit = next((v for k, v in real.items() if k == lay.name or k.endswith("." + lay.name)), None)
        rank, alpha, params = hit if hit is not None else (0, 0.0, 0)
        rows.append(PlanRow(name=lay.name, shape=[lay.out_features, lay.in_features], rank=rank, alpha=alpha,
                            params=params, kind=lay.kind, module_type=lay.module_type, depth=lay.depth))
    budget = Budget(r * sum(lay.params_per_rank for lay in layers), f"rank {r}")
    return Plan(strategy="peft_eva", budget=budget, spent=sum(row.params for row in rows), layers=rows,
                hparams={k: opts[k] for k in ("rho", "tau", "whiten", "adjust_scaling_factors")},
                model=model_name, targets=[lay.name for lay in layers])


register_method(PeftEvaMethod())
