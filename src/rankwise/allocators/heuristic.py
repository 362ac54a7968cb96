"""Heuristic allocators: rank by depth, by module type, or by a weight norm. Each only computes relative weights;
`pattern_from_weights` turns them into exact-budget ranks."""

from __future__ import annotations

from typing import Sequence

from ..types import Budget, LayerStats, RankPattern, RankwiseError
from .budget import pattern_from_weights
from .registry import register_allocator

__all__ = ["depth", "module_type", "weight_norm"]


def _relative_depths(stats: Sequence[LayerStats]) -> list[float]:
    """Depth of each layer in [0, 1] (first block 0, last block 1); layers outside blocks sit in the middle."""
    depths = [s.info.depth for s in stats]
    known = [d for d in depths if d is not None]
    if not known or max(known) == min(known):
        return [0.5] * len(stats)
    lo, hi = min(known), max(known)
    return [0.5 if d is None else (d - lo) / (hi - lo) for d in depths]


@register_allocator("depth", description="ranks grow (or decay) linearly with block depth; last/first = ratio")
def depth(
    stats: Sequence[LayerStats],
    budget: Budget,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_step: int = 1,
    direction: str = "grow",
    ratio: float = 4.0,
) -> RankPattern:
    """Weight 1 at one end and `ratio` at the other; `direction='grow'` puts the larger ranks in deeper blocks."""
    if direction not in ("grow", "decay"):
        raise RankwiseError(f"depth direction must be 'grow' or 'decay', got {direction!r}")
    if not ratio > 0:
        raise RankwiseError(f"depth ratio must be > 0, got {ratio!r}")
    t = _relative_depths(stats)
    if direction == "decay":
        t = [1 - x for x in t]
    weights = [1 + (ratio - 1) * x for x in t]
    return pattern_from_weights(
        stats, budget, weights, min_rank=min_rank, max_rank=max_rank, rank_step=rank_step, scores=weights
    )


@register_allocator("module_type", description="attention vs feed-forward layers split by a rank ratio")
def module_type(
    stats: Sequence[LayerStats],
    budget: Budget,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_step: int = 1,
    ratio: float = 2.0,
    other_weight: float = 1.0,
) -> RankPattern:
    """Attention layers get `ratio` times the rank of feed-forward layers (ratio < 1 favours feed-forward)."""
    if not ratio > 0 or not other_weight > 0:
        raise RankwiseError(f"module_type ratio and other_weight must be > 0, got {ratio!r}, {other_weight!r}")
    table = {"attention": ratio, "mlp": 1.0, "other": other_weight}
    weights = [table[s.info.module_type] for s in stats]
    return pattern_from_weights(
        stats, budget, weights, min_rank=min_rank, max_rank=max_rank, rank_step=rank_step, scores=weights
    )


@register_allocator(
    "weight_norm",
    description="ranks proportional to a weight metric (default stable_rank; or frobenius_norm, spectral_norm ...)",
    needs=(),
)
def weight_norm(
    stats: Sequence[LayerStats],
    budget: Budget,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_step: int = 1,
    metric: str = "stable_rank",
    power: float = 1.0,
) -> RankPattern:
    """Weight = metric ** power. Stable rank (sum sigma^2 / sigma_max^2) is scale-free, so layers of different
    init scales compare fairly; Frobenius norm favours large, high-energy layers."""
    values = [s[metric] for s in stats]
    if any(v < 0 for v in values):
        raise RankwiseError(f"metric {metric!r} has negative values; choose a norm-like metric")
    weights = [v**power for v in values]
    return pattern_from_weights(
        stats, budget, weights, min_rank=min_rank, max_rank=max_rank, rank_step=rank_step, scores=values
    )
