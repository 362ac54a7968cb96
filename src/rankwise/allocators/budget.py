"""Exact parameter budgets: parse what the user wrote, bound each layer's rank, and spend the budget.

A LoRA layer of rank r on an [out, in] weight costs r * (in + out) trainable parameters. Every allocator turns its
scores into per-layer weights and calls `fit_ranks`, which spends the budget to within one rank-step of the
cheapest layer, never over it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from ..types import Budget, LayerInfo, LayerStats, RankPattern, RankwiseError

__all__ = ["RankBounds", "parse_budget", "rank_bounds", "feasible_range", "fit_ranks", "smallest_step_cost", "pattern_from_weights"]

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}
_NUMBER_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgb]?)\s*$", re.IGNORECASE)
_PERCENT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


def parse_budget(
    spec: int | str | Budget | None,
    layers: Sequence[LayerInfo] = (),
    *,
    total_params: int | None = None,
    budget_rank: int | None = None,
) -> Budget:
    """Budget from `300000`, `"300k"`, `"1.2M"`, `"0.5%"` (of `total_params`), or `budget_rank=8` (what uniform
    rank 8 costs on `layers`). Exactly one of `spec` and `budget_rank` must be given."""
    if (spec is None) == (budget_rank is None):
        raise RankwiseError("give exactly one of a budget (e.g. 300k, 1.2M, 0.5%) or a budget rank (e.g. 8)")
    if isinstance(spec, Budget):
        return spec
    if budget_rank is not None:
        if not isinstance(budget_rank, int) or budget_rank < 1:
            raise RankwiseError(f"budget rank must be a positive integer, got {budget_rank!r}")
        if not layers:
            raise RankwiseError("a budget rank needs the target layers to price it")
        return Budget(budget_rank * sum(lay.params_per_rank for lay in layers), f"rank {budget_rank}")
    if isinstance(spec, bool):
        raise RankwiseError(f"budget must be a number of parameters, got {spec!r}")
    if isinstance(spec, int):
        return Budget(spec, str(spec))
    if isinstance(spec, float):
        if not math.isfinite(spec):
            raise RankwiseError(f"budget must be a finite number of parameters, got {spec!r}")
        return Budget(int(spec), str(spec))
    text = str(spec)
    if m := _PERCENT_RE.match(text):
        if not total_params:
            raise RankwiseError(f"budget {text!r} is a share of model parameters, but the model size is unknown")
        return Budget(int(total_params * float(m.group(1)) / 100), text.strip())
    if m := _NUMBER_RE.match(text):
        value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
        if not math.isfinite(value) or value > 1e15:  # 1e400 parses as inf: no model has that many parameters
            raise RankwiseError(f"budget {text!r} is not a usable number of parameters")
        return Budget(int(round(value)), text.strip())
    raise RankwiseError(f"cannot read budget {text!r}; use e.g. 300000, 300k, 1.2M, 0.5% or --budget-rank 8")


@dataclass(frozen=True)
class RankBounds:
    """Per-layer rank grid: ranks are multiples of `step` in [lo, hi]; hi = 0 means 'not adapted'."""

    lo: int
    hi: int
    step: int


def rank_bounds(
    layer: LayerInfo, min_rank: int = 1, max_rank: int | None = None, step: int = 1, selected: bool = True
) -> RankBounds:
    """The rank grid for one layer: min/max rank rounded onto multiples of `step`, and r <= min(in, out)."""
    if step < 1 or min_rank < 1 or (max_rank is not None and max_rank < min_rank):
        raise RankwiseError(
            f"rank bounds must satisfy 1 <= min_rank <= max_rank and step >= 1; got min_rank={min_rank}, "
            f"max_rank={max_rank}, step={step}"
        )
    if not selected:
        return RankBounds(0, 0, step)
    cap = layer.max_rank if max_rank is None else min(max_rank, layer.max_rank)
    lo = math.ceil(min_rank / step) * step
    hi = (cap // step) * step
    if hi < lo:
        raise RankwiseError(
            f"layer {layer.name} {list(layer.shape)} cannot take rank {lo} (rank <= min(in, out) = "
            f"{layer.max_rank}, max_rank={max_rank}, step={step}); lower --min-rank or --rank-step"
        )
    return RankBounds(lo, hi, step)


def smallest_step_cost(layers: Sequence[LayerInfo], bounds: Sequence[RankBounds]) -> int:
    """Cost of the cheapest single rank-step among adapted layers: the rounding tolerance of every allocator."""
    return min(b.step * lay.params_per_rank for lay, b in zip(layers, bounds) if b.hi > 0)


def feasible_range(layers: Sequence[LayerInfo], bounds: Sequence[RankBounds]) -> tuple[int, int]:
    """(every adapted layer at its min rank, every adapted layer at its max rank), in parameters."""
    lo = sum(b.lo * lay.params_per_rank for lay, b in zip(layers, bounds))
    hi = sum(b.hi * lay.params_per_rank for lay, b in zip(layers, bounds))
    return lo, hi


def _water_fill(weights, costs, bounds, budget) -> list[float]:
    """Continuous ranks r_i = clip(lam * w_i, lo_i, hi_i) with sum r_i c_i = budget (bisection on lam)."""

    def spend(lam):
        return sum(min(max(lam * w, b.lo), b.hi) * c for w, c, b in zip(weights, costs, bounds))

    lo_lam, hi_lam = 0.0, max(b.hi / w for w, b in zip(weights, bounds) if b.hi > 0)
    for _ in range(200):
        mid = (lo_lam + hi_lam) / 2
        lo_lam, hi_lam = (mid, hi_lam) if spend(mid) <= budget else (lo_lam, mid)
    return [min(max(lo_lam * w, b.lo), b.hi) for w, b in zip(weights, bounds)]


def fit_ranks(
    layers: Sequence[LayerInfo], weights: Sequence[float], bounds: Sequence[RankBounds], budget: Budget
) -> list[int]:
    """Integer ranks proportional to `weights`, on each layer's grid, spending `budget` within one rank-step.

    1. water-fill continuous ranks so the budget is spent exactly;
    2. round each down onto its step grid (never over budget);
    3. hand the leftover out one step at a time to the layer that lost most in rounding and still fits.
    """
    if not any(b.hi > 0 for b in bounds):
        raise RankwiseError("no layer is selected for adaptation; widen the selection (e.g. --percentile)")
    lo_cost, hi_cost = feasible_range(layers, bounds)
    if not lo_cost <= budget.params <= hi_cost:
        raise RankwiseError(
            f"budget {budget.params:,} is outside the feasible range [{lo_cost:,}, {hi_cost:,}] for these "
            f"{sum(b.hi > 0 for b in bounds)} layers (every layer at min rank .. every layer at max rank); "
            "change the budget or --min-rank/--max-rank"
        )
    costs = [lay.params_per_rank for lay in layers]
    # Non-positive weights would pin a layer to its minimum for every lam; a tiny floor keeps it on the curve.
    top = max((w for w, b in zip(weights, bounds) if b.hi > 0), default=1.0)
    floor = 1e-9 * top if top > 0 else 1.0
    safe_w = [max(float(w), floor) if b.hi > 0 else 0.0 for w, b in zip(weights, bounds)]
    target = _water_fill(safe_w, costs, bounds, budget.params)
    ranks = [max(b.lo, int(math.floor(t / b.step)) * b.step) if b.hi > 0 else 0 for t, b in zip(target, bounds)]
    left = _hand_out(ranks, target, costs, bounds, budget.params - sum(r * c for r, c in zip(ranks, costs)))
    return _exchange(ranks, target, costs, bounds, left)


def _hand_out(ranks: list[int], target, costs, bounds, left: int, skip: int = -1, below: float = math.inf) -> int:
    """Give the leftover out one step at a time to the layer that lost most in rounding and still fits (only to
    layers whose step costs less than `below`, when given)."""
    while True:
        fits = [i for i, (r, c, b) in enumerate(zip(ranks, costs, bounds))
                if b.hi > 0 and r + b.step <= b.hi and b.step * c <= left and i != skip and b.step * c < below]
        if not fits:
            return left
        i = max(fits, key=lambda j: ((target[j] - ranks[j]) / bounds[j].step, -costs[j]))
        ranks[i] += bounds[i].step
        left -= bounds[i].step * costs[i]


def _exchange(ranks: list[int], target, costs, bounds, left: int, rounds: int = 20) -> list[int]:
    """Layers of different cost can leave more than the cheapest step unspent (a 384 x 1536 step does not fit,
    a 384 x 384 one no longer fits): take one step back from a layer and hand out again while that spends more.
    The hand-out is tried as usual and also only to cheaper layers: otherwise the step taken back from a wide layer
    can go straight to another wide layer (1,920 back, 1,920 out) and three 768-steps that fit are never tried.
    Matters at budgets of a few rank steps, where rounding is a large share of the budget."""
    for _ in range(rounds):
        if left == 0:
            break
        best = None
        for i, (r, c, b) in enumerate(zip(ranks, costs, bounds)):
            if b.hi == 0 or r - b.step < b.lo or b.step * c <= left:
                continue
            for below in (math.inf, b.step * c):
                trial = list(ranks)
                trial[i] -= b.step
                rest = _hand_out(trial, target, costs, bounds, left + b.step * c, skip=i, below=below)
                if rest < left and (best is None or rest < best[1]):
                    best = (trial, rest)
        if best is None:
            break
        ranks[:], left = best
    return ranks


def pattern_from_weights(
    stats: Sequence[LayerStats],
    budget: Budget,
    weights: Sequence[float],
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_step: int = 1,
    selected: Sequence[bool] | None = None,
    scores: Sequence[float] | None = None,
) -> RankPattern:
    """The shared last step of every static allocator: relative weights -> exact-budget integer ranks."""
    layers = [s.info for s in stats]
    selected = [True] * len(layers) if selected is None else list(selected)
    bounds = [rank_bounds(lay, min_rank, max_rank, rank_step, sel) for lay, sel in zip(layers, selected)]
    if min_rank == 1 and budget.params < feasible_range(layers, bounds)[0]:
        # Below the cost of rank 1 on every layer the allocator decides which layers get any rank at all: the
        # weights choose, and the rest stay unadapted (rank 0). An explicit min_rank > 1 keeps its floor.
        bounds = [RankBounds(0, b.hi, b.step) for b in bounds]
        if any(b.hi > 0 for b in bounds) and budget.params < smallest_step_cost(layers, bounds):
            raise RankwiseError(f"budget {budget.params:,} is below one rank of the cheapest target layer "
                                f"({smallest_step_cost(layers, bounds):,} parameters); raise the budget")
    ranks = fit_ranks(layers, weights, bounds, budget)
    score_map = None if scores is None else {lay.name: float(v) for lay, v in zip(layers, scores)}
    return RankPattern({lay.name: r for lay, r in zip(layers, ranks)}, scores=score_map)
