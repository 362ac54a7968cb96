"""`discovered`: ranks proportional to the ranks a trained run discovered (`rankwise plan --from-run RUN_DIR`).

A multi-rank run's effective ranks or an AdaLoRA run's final ranks arrive as the `discovered_rank` metric
(`rankwise.methods.discovery`); layers that ended at rank 0 stay unadapted. The weights go through
`pattern_from_weights`, so the new budget is spent within one rank step like every other strategy.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..types import Budget, LayerStats, RankPattern, RankwiseError
from .budget import pattern_from_weights
from .registry import register_allocator

__all__ = ["discovered"]


@register_allocator("discovered", description="ranks proportional to those a multirank/adalora run discovered "
                                               "(rankwise plan --from-run RUN_DIR)", needs=("discovered_rank",))
def discovered(
    stats: Sequence[LayerStats], budget: Budget, *, min_rank: int = 1, max_rank: int | None = None,
    rank_step: int = 1, power: float = 1.0,
) -> RankPattern:
    """Weight = discovered_rank ** power (power < 1 flattens the profile, > 1 sharpens it)."""
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
        raise RankwiseError(f"power must be > 0, got {power!r}")
    values = [s["discovered_rank"] for s in stats]
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise RankwiseError("discovered ranks must be finite and >= 0")
    if not any(v > 0 for v in values):
        raise RankwiseError("every discovered rank is 0: nothing to allocate in proportion to")
    return pattern_from_weights(stats, budget, [v ** power for v in values], min_rank=min_rank, max_rank=max_rank,
                                rank_step=rank_step, selected=[v > 0 for v in values], scores=values)
