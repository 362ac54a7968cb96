"""Data-driven allocators: ranks from statistics measured on a calibration sample of the training data
(`rankwise.stats.calibration`; their names in `rankwise.metric_names`), spent under the same exact parameter
budget as every other strategy.

- `activation`: rank proportional to an activation signal of the layer's input/output.
- `gradient`: GoRA's allocation (He et al., NeurIPS 2025): importance I = mean |W * G| over the weight's entries,
  normalised to shares a = I / sum I; each layer gets the share a of the parameter budget, so its rank is
  proportional to a / (in + out).
- `eva`: EVA's rank redistribution (Paischer et al.; peft's EVA) under a PARAMETER budget: the explained-variance
  ratios of every layer's input directions are pooled and taken greedily, largest first, while their cost
  (in + out parameters per direction) fits the budget.

Each turns its scores into relative weights and finishes through `pattern_from_weights` (water-fill, round onto
the rank grid, hand out the leftover), so each spends the budget to within one rank step like the others.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..metric_names import DATA_METRICS, EVR_PREFIX, evr_key
from ..types import Budget, LayerStats, RankPattern, RankwiseError
from .budget import RankBounds, feasible_range, pattern_from_weights, rank_bounds
from .registry import get_allocator, register_allocator

__all__ = ["activation", "gradient", "eva", "eva_counts", "is_data_driven", "ACTIVATION_SIGNALS"]

# signal name -> (metric, transform): norms enter as root-mean-square, so a layer with twice the input magnitude
# gets twice (not four times) the weight.
ACTIVATION_SIGNALS = {
    "effective_rank": ("act_effective_rank", lambda v: v),
    "input_norm": ("act_in_norm2", math.sqrt),
    "output_norm": ("act_out_norm2", math.sqrt),
}
_FEATURES = {"linear": lambda c: c, "sqrt": math.sqrt, "log1p": math.log1p}
_IMPORTANCE = ("mean_sensitivity", "sensitivity", "grad_norm")


def is_data_driven(strategy: str) -> bool:
    """True when the strategy reads statistics that only a calibration pass over the data provides."""
    return any(m in DATA_METRICS or m.startswith(EVR_PREFIX) for m in get_allocator(strategy).needs)


def _check_power(power) -> None:
    if not isinstance(power, (int, float)) or not power > 0:
        raise RankwiseError(f"power must be > 0, got {power!r}")


@register_allocator(
    "activation",
    description="ranks proportional to an input-activation signal (needs --data): signal=effective_rank "
                "(or input_norm, output_norm)",
    needs=("act_effective_rank", "act_in_norm2", "act_out_norm2"),
)
def activation(
    stats: Sequence[LayerStats],
    budget: Budget,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_step: int = 1,
    signal: str = "effective_rank",
    power: float = 1.0,
) -> RankPattern:
    """Weight = signal ** power. `effective_rank`: how many input directions the data really uses (exp of the
    entropy of the input's singular values); `input_norm`/`output_norm`: RMS norm of the input/output per token."""
    if signal not in ACTIVATION_SIGNALS:
        raise RankwiseError(f"activation signal must be one of {', '.join(ACTIVATION_SIGNALS)}, got {signal!r}")
    _check_power(power)
    metric, fn = ACTIVATION_SIGNALS[signal]
    values = [fn(max(float(s[metric]), 0.0)) for s in stats]
    weights = [v**power for v in values]
    return pattern_from_weights(stats, budget, weights, min_rank=min_rank, max_rank=max_rank, rank_step=rank_step,
                                scores=values)


@register_allocator(
    "gradient",
    description="GoRA: share of the parameter budget = normalised mean |W*G| of the loss gradient (needs --data)",
    needs=("grad_sensitivity", "grad_norm"),
)
def gradient(
    stats: Sequence[LayerStats],
    budget: Budget,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_step: int = 1,
    importance: str = "mean_sensitivity",
    features: str = "linear",
) -> RankPattern:
    """a_i = I_i / sum_j I_j; layer i's rank ~ a_i * budget / f(in_i + out_i). `importance`: mean_sensitivity
    (GoRA: mean of |W*G| over the weight), sensitivity (its sum), or grad_norm (||G||_F). `features` (GoRA's
    feature adjustment): linear (the share is in parameters), sqrt or log1p (milder size correction)."""
    if importance not in _IMPORTANCE:
        raise RankwiseError(f"gradient importance must be one of {', '.join(_IMPORTANCE)}, got {importance!r}")
    if features not in _FEATURES:
        raise RankwiseError(f"gradient features must be one of {', '.join(_FEATURES)}, got {features!r}")
    raw = []
    for s in stats:
        if importance == "mean_sensitivity":
            raw.append(float(s["grad_sensitivity"]) / (s.info.out_features * s.info.in_features))
        else:
            raw.append(float(s["grad_sensitivity" if importance == "sensitivity" else "grad_norm"]))
    total = sum(raw)
    if not total > 0 or not math.isfinite(total):
        raise RankwiseError("every layer's gradient importance is 0: the calibration loss does not depend on the "
                            "target layers (check the labels of --data)")
    shares = [v / total for v in raw]
    weights = [a / _FEATURES[features](s.info.params_per_rank) for a, s in zip(shares, stats)]
    return pattern_from_weights(stats, budget, weights, min_rank=min_rank, max_rank=max_rank, rank_step=rank_step,
                                scores=shares)


def _ratios(s: LayerStats, upto: int) -> list[float]:
    """Explained-variance ratio of the first `upto` input directions. Past the stored ones, the unexplained rest is
    spread evenly over the remaining min(in, out) directions (never above the last stored ratio)."""
    stored = []
    while evr_key(len(stored) + 1) in s.metrics:
        stored.append(max(float(s.metrics[evr_key(len(stored) + 1)]), 0.0))
    if not stored:
        raise RankwiseError(f"layer {s.name!r} has no explained-variance ratios ({evr_key(1)}...); pass --data")
    if upto <= len(stored):
        return stored[:upto]
    rest = max(1.0 - sum(stored), 0.0) / max(s.info.max_rank - len(stored), 1)
    return stored + [min(rest, stored[-1])] * (upto - len(stored))


def eva_counts(stats: Sequence[LayerStats], budget: Budget, *, min_rank: int = 1, max_rank: int | None = None,
               rank_step: int = 1, rho: float = 2.0) -> list[int]:
    """EVA's global choice under a parameter budget: every layer starts at its minimum rank; then input
    directions, largest explained-variance ratio first (ties: the cheaper layer), are added while their cost fits
    and the layer stays within min(max rank, rho x the uniform rank this budget buys)."""
    infos = [s.info for s in stats]
    bounds = [rank_bounds(lay, min_rank, max_rank, rank_step) for lay in infos]
    if min_rank == 1 and budget.params < feasible_range(infos, bounds)[0]:  # below rank 1 everywhere: from 0
        bounds = [RankBounds(0, b.hi, b.step) for b in bounds]
    uniform = budget.params / sum(lay.params_per_rank for lay in infos)
    counts = [b.lo for b in bounds]
    left = budget.params - sum(c * lay.params_per_rank for c, lay in zip(counts, infos))
    caps = [max(b.lo, min(b.hi, int(math.ceil(rho * uniform)))) for b in bounds]
    pool = [(-r, lay.params_per_rank, i, j)
            for i, (s, lay, cap) in enumerate(zip(stats, infos, caps))
            for j, r in enumerate(_ratios(s, cap)) if j >= counts[i]]
    for _, cost, i, j in sorted(pool):
        if counts[i] == j and cost <= left:  # directions of one layer are taken in order
            counts[i] += 1
            left -= cost
    return counts


@register_allocator(
    "eva",
    description="EVA: input directions with the largest explained variance, chosen globally under the parameter "
                "budget (needs --data)",
    needs=(evr_key(1),),
)
def eva(
    stats: Sequence[LayerStats],
    budget: Budget,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_step: int = 1,
    rho: float = 2.0,
) -> RankPattern:
    """Ranks follow the number of directions each layer won in `eva_counts`; `rho` caps a layer at rho times the
    uniform rank (peft EVA's rho). The exact-budget step then puts leftover parameters where rounding lost most."""
    if not isinstance(rho, (int, float)) or not rho >= 1:
        raise RankwiseError(f"eva rho must be >= 1, got {rho!r}")
    counts = eva_counts(stats, budget, min_rank=min_rank, max_rank=max_rank, rank_step=rank_step, rho=rho)
    return pattern_from_weights(stats, budget, [float(c) for c in counts], min_rank=min_rank, max_rank=max_rank,
                                rank_step=rank_step, scores=[float(c) for c in counts])
