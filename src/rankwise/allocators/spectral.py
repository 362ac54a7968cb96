"""`spectral`: ranks from heavy-tailed self-regularisation metrics (Adaptive-Rank-LoRA / AlphaPruning style).

score = w_hill * alpha_norm + w_spikes * (1 - spikes_norm), both min-max normalised over the target layers.

Direction. A large Hill alpha means a light-tailed, less "trained" spectrum, and few spikes above the
Marchenko-Pastur edge mean little learned structure; HT-SR theory (and the Adaptive-Rank-LoRA paper) argues such
layers need more adaptation, so a higher score gets a higher rank. With `select="top"` and `percentile=p` we keep
the layers whose score is at or above the p-th percentile. The public Adaptive-Rank-LoRA code instead keeps the
lower-score half; `select="bottom"` reproduces that, so both readings can be compared at the same budget.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..types import Budget, LayerStats, RankPattern, RankwiseError
from .budget import pattern_from_weights
from .registry import register_allocator

__all__ = ["spectral", "spectral_scores"]

_SCALINGS = {
    "linear": lambda s: s,
    "sqrt": math.sqrt,
    # log1p(9 s) / log(10) maps [0, 1] onto [0, 1] while compressing the high end
    "log": lambda s: math.log1p(9.0 * s) / math.log(10.0),
}


def _minmax(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    span = v.max() - v.min()
    return np.zeros_like(v) if span <= 0 or not np.isfinite(span) else (v - v.min()) / span


def spectral_scores(stats: Sequence[LayerStats], w_hill: float = 0.7, w_spikes: float = 0.3) -> np.ndarray:
    """The composite score in [0, w_hill + w_spikes] for each layer."""
    alpha_norm = _minmax([s["alpha_hill"] for s in stats])
    spikes_norm = _minmax([s["num_spikes"] for s in stats])
    return w_hill * alpha_norm + w_spikes * (1.0 - spikes_norm)


def _selection(scores: np.ndarray, select: str, percentile: float) -> list[bool]:
    if select == "all":
        return [True] * len(scores)
    if not 0 <= percentile < 100:
        raise RankwiseError(f"percentile must be in [0, 100), got {percentile!r}")
    if select == "top":
        return list(scores >= np.percentile(scores, percentile))
    return list(scores <= np.percentile(scores, 100 - percentile))


@register_allocator(
    "spectral",
    description="ranks from Hill alpha and MP spikes: score = 0.7*alpha_norm + 0.3*(1-spikes_norm), scaled",
    needs=("alpha_hill", "num_spikes"),
)
def spectral(
    stats: Sequence[LayerStats],
    budget: Budget,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_step: int = 1,
    w_hill: float = 0.7,
    w_spikes: float = 0.3,
    scaling: str = "linear",
    select: str = "all",
    percentile: float = 50.0,
    floor: float = 0.1,
) -> RankPattern:
    """Higher score -> higher rank. `scaling` (linear/log/sqrt) shapes score -> rank between min and max rank;
    `floor` keeps the lowest-scoring selected layer off zero so every selected layer trains."""
    if scaling not in _SCALINGS:
        raise RankwiseError(f"scaling must be one of {sorted(_SCALINGS)}, got {scaling!r}")
    if select not in ("all", "top", "bottom"):
        raise RankwiseError(f"select must be 'all', 'top' or 'bottom', got {select!r}")
    if w_hill < 0 or w_spikes < 0 or w_hill + w_spikes <= 0:
        raise RankwiseError(f"w_hill and w_spikes must be >= 0 and not both 0, got {w_hill}, {w_spikes}")
    scores = spectral_scores(stats, w_hill, w_spikes)
    norm = scores / (w_hill + w_spikes)
    weights = [floor + _SCALINGS[scaling](float(s)) for s in norm]
    return pattern_from_weights(
        stats,
        budget,
        weights,
        min_rank=min_rank,
        max_rank=max_rank,
        rank_step=rank_step,
        selected=_selection(scores, select, percentile),
        scores=scores,
    )
