"""`uniform`: the same rank everywhere, the baseline every other allocator is compared with at equal budget."""

from __future__ import annotations

from typing import Sequence

from ..types import Budget, LayerStats, RankPattern, RankwiseError
from .budget import pattern_from_weights, rank_bounds
from .registry import register_allocator

__all__ = ["uniform"]


@register_allocator("uniform", description="same rank on every target layer (plain LoRA); leftovers by rounding")
def uniform(
    stats: Sequence[LayerStats], budget: Budget, *, min_rank: int = 1, max_rank: int | None = None, rank_step: int = 1
) -> RankPattern:
    """Equal weights: with `budget_rank=r` every layer gets exactly r; other budgets differ by at most one step.
    A budget below `min_rank` on every layer is refused: rank 0 on some layers would no longer be uniform."""
    for s in stats:  # a rank grid no layer can take is the first thing to say
        rank_bounds(s.info, min_rank, max_rank, rank_step)
    floor = sum(s.info.params_per_rank for s in stats) * max(min_rank, 1)
    if budget.params < floor:
        raise RankwiseError(f"uniform needs rank {max(min_rank, 1)} on each of the {len(stats)} target layers "
                            f"({floor:,} parameters); budget {budget.params:,} is smaller: narrow the targets "
                            "(e.g. query value) or use a strategy that can leave layers at rank 0")
    return pattern_from_weights(
        stats, budget, [1.0] * len(stats), min_rank=min_rank, max_rank=max_rank, rank_step=rank_step
    )
