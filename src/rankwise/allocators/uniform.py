"""`uniform`: the same rank everywhere, the baseline every other allocator is compared with at equal budget."""

from __future__ import annotations

from typing import Sequence

from ..types import Budget, LayerStats, RankPattern
from .budget import pattern_from_weights
from .registry import register_allocator

__all__ = ["uniform"]


@register_allocator("uniform", description="same rank on every target layer (plain LoRA); leftovers by rounding")
def uniform(
    stats: Sequence[LayerStats], budget: Budget, *, min_rank: int = 1, max_rank: int | None = None, rank_step: int = 1
) -> RankPattern:
    """Equal weights: with `budget_rank=r` every layer gets exactly r; other budgets differ by at most one step."""
    return pattern_from_weights(
        stats, budget, [1.0] * len(stats), min_rank=min_rank, max_rank=max_rank, rank_step=rank_step
    )
