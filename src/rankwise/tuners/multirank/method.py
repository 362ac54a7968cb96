"""`rankwise train --method multirank`: the Method seam for multi-rank LoRA (registered on import).

    --ranks 32,16,8,4,2                 the same branches on every target layer
    --budget 300k | --budget-rank 8     per-layer halving ladders that spend the budget, coefficients included

A budget is spent like the allocators spend it: each layer's rank sum S_l comes from `fit_ranks` (uniform
weights, every layer at least the smallest ladder [2, 1]), then S_l is split into a halving ladder (t, t/2, t/4,
... at most 5 branches, the remainder on the top branch). Branch coefficients are trainable parameters too, so the
ladder is refitted until rank sums plus coefficients fit the budget, within one rank step of the cheapest layer.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...methods.base import Built, Method, MethodContext, PlainLora, register_method
from ...types import Budget, LayerInfo, RankwiseError
from .config import COEFFICIENT_INITS, SCALINGS, MultiRankConfig, parse_ranks
from .report import DEFAULT_ENERGY, TABLE_NAME

__all__ = ["MultiRankMethod", "ladder", "fit_ladders", "SMALLEST_LADDER", "MAX_BRANCHES"]

SMALLEST_LADDER = [2, 1]  # one branch would be plain LoRA with a scalar
MAX_BRANCHES = 5  # the length of the design's [32, 16, 8, 4, 2]
_OPTIONS = {"ranks": None, "coefficient_init": "ones", "scaling": "max", "energy": DEFAULT_ENERGY}
_NOT_FOR_MULTIRANK = {"plan": "--plan", "strategy": "--strategy", "preset": "--preset", "rank": "--rank",
                      "strategy_options": "strategy options", "calib_samples": "--calib-samples", "dora": "--dora",
                      "rslora": "--rslora"}


def ladder(total: int, max_branches: int = MAX_BRANCHES) -> list[int]:
    """A rank sum as a halving ladder: the largest top t whose ladder t, t//2, t//4, ... fits, remainder on top."""

    def halving(t: int) -> list[int]:
        out = []
        while t >= 1 and len(out) < max_branches:
            out.append(t)
            t //= 2
        return out

    top = max(t for t in range(1, total + 1) if sum(halving(t)) <= total)
    out = halving(top)
    out[0] += total - sum(out)
    return out


def _cost(info: LayerInfo, ranks: list[int]) -> int:
    return sum(ranks) * info.params_per_rank + len(ranks)


def fit_ladders(infos: list[LayerInfo], budget: Budget) -> tuple[dict[str, list[int]], int]:
    """({layer: ladder}, spent) with spent <= budget, short of it by about one rank step of the cheapest layer."""
    from ...allocators.budget import fit_ranks, rank_bounds

    need = sum(_cost(i, SMALLEST_LADDER) for i in infos)
    if budget.params < need:
        raise RankwiseError(f"budget {budget.params:,} is too small for the smallest multi-rank ladder "
                            f"{SMALLEST_LADDER} on {len(infos)} target layers (needs {need:,} parameters, "
                            "coefficients included); raise the budget or narrow --targets")
    bounds = [rank_bounds(i, min_rank=sum(SMALLEST_LADDER)) for i in infos]
    allowance, best = len(SMALLEST_LADDER) * len(infos), None
    for _ in range(20):  # coefficients depend on the ladders, the ladders on what the coefficients leave
        sums = fit_ranks(infos, [1.0] * len(infos), bounds, Budget(budget.params - allowance, budget.spec))
        ladders = {i.name: ladder(s) for i, s in zip(infos, sums)}
        spent = sum(_cost(i, ladders[i.name]) for i in infos)
        coefs = sum(len(v) for v in ladders.values())
        if spent <= budget.params and (best is None or spent > best[1]):
            best = (ladders, spent)
        if coefs == allowance:
            break
        allowance = max(allowance + 1, coefs) if spent > budget.params else coefs
    if best is None:  # pragma: no cover - the smallest ladders always fit once the check above passed
        raise RankwiseError(f"could not fit multi-rank ladders into budget {budget.params:,}")
    return best


def _options(options: dict) -> dict:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in _OPTIONS.items())
        raise RankwiseError(f"method 'multirank' has no option {', '.join(unknown)}; allowed: {allowed}")
    out = {**_OPTIONS, **options}
    if out["coefficient_init"] not in COEFFICIENT_INITS:
        raise RankwiseError(f"coefficient_init must be one of {', '.join(COEFFICIENT_INITS)}, "
                            f"got {out['coefficient_init']!r}")
    if out["scaling"] not in SCALINGS:
        raise RankwiseError(f"scaling must be one of {', '.join(SCALINGS)}, got {out['scaling']!r}")
    e = out["energy"]
    if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 < e <= 1:
        raise RankwiseError(f"energy (for the discovered ranks) must be in (0, 1], got {e!r}")
    return out


class MultiRankMethod(Method):
    name = "multirank"
    description = "several LoRA ranks per layer with learned coefficients (fused); exports to plain LoRA"

    def check(self, options: dict, choice: dict) -> None:
        from ...allocators.budget import parse_budget

        opts = _options(dict(options))
        bad = [flag for key, flag in _NOT_FOR_MULTIRANK.items() if choice.get(key)]
        if bad:
            raise RankwiseError(f"--method multirank takes --ranks R1,R2,... or --budget/--budget-rank (with "
                                f"--targets), not {', '.join(bad)}")
        budget, budget_rank = choice.get("budget"), choice.get("budget_rank")
        if opts["ranks"] is not None:
            if budget is not None or budget_rank is not None:
                raise RankwiseError("give --ranks or --budget/--budget-rank, not both: a budget fits the ranks")
            parse_ranks(opts["ranks"])
        if budget is not None and budget_rank is not None:
            raise RankwiseError("give one of --budget and --budget-rank, not both")
        if budget is not None:
            parse_budget(budget, total_params=10 ** 15)  # syntax only; a share of the model is priced in build
        if budget_rank is not None:
            parse_budget(None, [LayerInfo("x", 1, 1)], budget_rank=budget_rank)

    def build(self, base_model, ctx: MethodContext) -> Built:
        from collections import Counter

        import torch

        from ...allocators.budget import parse_budget
        from ...targets import resolve_targets
        from .model import get_multirank_model

        opts, c = _options(dict(ctx.options)), ctx.choice
        self.check(ctx.options, c)
        infos = resolve_targets(base_model, c.get("targets") or "all-linear")
        info: dict = {"source": "multirank", "strategy": None, "coefficient_init": opts["coefficient_init"],
                      "scaling": opts["scaling"], "lora_alpha": c.get("lora_alpha")}
        if c.get("budget") is not None or c.get("budget_rank") is not None:
            total = sum(p.numel() for p in base_model.parameters())
            budget = parse_budget(c.get("budget"), infos, total_params=total, budget_rank=c.get("budget_rank"))
            pattern, spent = fit_ladders(infos, budget)
            ranks = list(Counter(tuple(v) for v in pattern.values()).most_common(1)[0][0])
            info["budget"] = budget.to_dict()
        else:
            ranks = parse_ranks(opts["ranks"] if opts["ranks"] is not None else [32, 16, 8, 4, 2])
            pattern = {i.name: list(ranks) for i in infos}
            spent = sum(_cost(i, ranks) for i in infos)
        config = MultiRankConfig(
            ranks=ranks, lora_alpha=c.get("lora_alpha"), lora_dropout=ctx.lora_kwargs.get("lora_dropout", 0.0),
            target_modules=[i.name for i in infos], modules_to_save=ctx.lora_kwargs.get("modules_to_save") or None,
            coefficient_init=opts["coefficient_init"], scaling=opts["scaling"], rank_pattern=pattern,
            task_type=ctx.lora_kwargs.get("task_type"),
            base_model_name_or_path=ctx.lora_kwargs.get("base_model_name_or_path"))
        model = get_multirank_model(base_model, config, generator=torch.Generator().manual_seed(ctx.seed))
        real = model.adapter_parameters()
        if real != spent:  # the model must hold exactly what was priced
            raise RankwiseError(f"multi-rank model holds {real:,} adapter parameters, {spent:,} were planned")
        info.update(spent=spent, layers_adapted=len(infos), ranks=ranks,
                    ladders=sorted({tuple(v) for v in pattern.values()}, key=sum, reverse=True))
        info["ladders"] = [list(v) for v in info["ladders"]]
        return Built(model=model, plan=None, lora_params=spent, info=info, state={"energy": opts["energy"]})

    def finish(self, built: Built, ctx: MethodContext, run_dir: Path) -> dict:
        """The rank-discovery table (json + csv) and its plot in the run folder; raises on diverged weights."""
        from .report import layer_rows, write_table

        model = built.model
        rows = layer_rows(model.resolved_config(), model.adapter_state_dict(), built.state.get("energy",
                                                                                                DEFAULT_ENERGY))
        write_table(rows, Path(run_dir))
        plot = _plot(rows, Path(run_dir) / f"{TABLE_NAME}.png")
        n = len(rows)
        return {"table": f"{TABLE_NAME}.json", "plot": plot, "energy": rows[0]["energy"] if rows else None,
                "mean_effective_rank": sum(r["effective_rank"] for r in rows) / n if n else 0.0,
                "mean_rank_sum": sum(sum(r["ranks"]) for r in rows) / n if n else 0.0}

    def load(self, base_model, run_dir):
        from .model import load_multirank

        return load_multirank(base_model, run_dir)

    def to_lora(self, run_dir: str | os.PathLike, **opts) -> PlainLora:
        """Exact: rank sum r_i per layer, s_i c_i folded into B. With rank/energy: SVD-compressed per layer."""
        from peft import LoraConfig

        from ...methods.plain import compress_lora, plain_from_deltas
        from .report import layer_deltas, read_adapter

        config, tensors = read_adapter(run_dir)
        heads = {f"base_model.model.{k}": v for k, v in tensors.items()
                 if not k.rpartition(".")[2].startswith("multirank_")}
        base = LoraConfig(r=1, target_modules=sorted(config.rank_pattern), modules_to_save=config.modules_to_save,
                          task_type=config.task_type, lora_dropout=config.lora_dropout,
                          fan_in_fan_out=config.fan_in_fan_out, base_model_name_or_path=config.base_model_name_or_path)
        plain = plain_from_deltas(base, layer_deltas(config, tensors), heads)
        if opts.get("rank") is not None or opts.get("energy") is not None:
            return compress_lora(plain, rank=opts.get("rank"), energy=opts.get("energy"))
        return plain

    def discovered_ranks(self, run_dir: str | os.PathLike) -> dict[str, int]:
        """Per layer, the effective rank of the trained delta (the table written after training, else recomputed
        from the adapter at the default energy)."""
        from .report import layer_rows, read_adapter, read_table

        rows = read_table(run_dir)
        if rows is None:
            rows = layer_rows(*read_adapter(run_dir))
        return {r["name"]: int(r["effective_rank"]) for r in rows}


def _plot(rows: list[dict], path: Path) -> str | None:
    """The plot needs matplotlib (the `plot` extra); without it the run still finishes and says so."""
    from ...experiments.plots import plot_multirank

    try:
        plot_multirank(rows, path)
    except RankwiseError as e:
        import sys

        print(f"rankwise: no {path.name}: {e}", file=sys.stderr)
        return None
    return path.name


register_method(MultiRankMethod())
