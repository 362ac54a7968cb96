"""One registry of allocators, read by the Python API and the CLI alike.

An allocator is a pure function `(stats, budget, *, min_rank, max_rank, rank_step, **hparams) -> RankPattern`.
It never touches a model and does no I/O; `allocate` checks what it returns (only target names, ranks on the grid,
spent <= budget) so a buggy allocator cannot hand peft a wrong plan.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..types import Budget, LayerStats, RankPattern, RankwiseError
from .budget import rank_bounds, smallest_step_cost

__all__ = ["AllocatorSpec", "Allocation", "register_allocator", "get_allocator", "list_allocators", "allocate",
           "check_strategy"]

_COMMON = ("min_rank", "max_rank", "rank_step")
_REGISTRY: dict[str, "AllocatorSpec"] = {}


@dataclass(frozen=True)
class AllocatorSpec:
    name: str
    fn: Callable[..., RankPattern]
    description: str
    needs: tuple[str, ...] = ()  # metrics the allocator reads from LayerStats
    kind: str = "static"  # "static" (pure function) | "dynamic" (steps during training; holds state)

    @property
    def hparams(self) -> dict[str, Any]:
        """Allocator-specific keyword arguments and their defaults (the common rank bounds excluded)."""
        sig = inspect.signature(self.fn)
        return {
            n: p.default
            for n, p in sig.parameters.items()
            if p.kind is p.KEYWORD_ONLY and n not in _COMMON
        }

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "description": self.description,
                "needs": list(self.needs), "hparams": self.hparams}


@dataclass(frozen=True)
class Allocation:
    """An allocator's decision plus the accounting: what it was given and what it spent."""

    strategy: str
    pattern: RankPattern
    budget: Budget
    spent: int
    tolerance: int  # one smallest rank-step: spent is in [budget - tolerance, budget] when the grid allows
    hparams: dict = field(default_factory=dict)


def register_allocator(name: str, *, description: str, needs: Sequence[str] = (), kind: str = "static"):
    """Decorator: add an allocator to the registry under `name` (the CLI's --strategy value)."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"allocator {name!r} is already registered")
        _REGISTRY[name] = AllocatorSpec(name, fn, description, tuple(needs), kind)
        return fn

    return wrap


def get_allocator(name: str) -> AllocatorSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RankwiseError(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}") from None


def list_allocators() -> list[AllocatorSpec]:
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def _check_hparams(spec: AllocatorSpec, hparams: dict) -> None:
    unknown = sorted(set(hparams) - set(spec.hparams))
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in spec.hparams.items()) or "none"
        raise RankwiseError(f"strategy {spec.name!r} has no option {', '.join(unknown)}; allowed: {allowed}")
    from ..parsing import check_options

    check_options(hparams, spec.hparams, f"strategy {spec.name!r}")  # w_hill=abc or NaN: one line, not a trace


def check_strategy(strategy: str, hparams: dict | None = None) -> AllocatorSpec:
    """Check a strategy name and its options (names and types) without any model: fails in milliseconds."""
    spec = get_allocator(strategy)
    _check_hparams(spec, dict(hparams or {}))
    return spec


def _check_stats(spec: AllocatorSpec, stats: Sequence[LayerStats]) -> None:
    if not stats:
        raise RankwiseError("no layers to allocate over (the target list selected nothing)")
    missing = sorted({m for s in stats for m in spec.needs if m not in s.metrics})
    if missing:
        raise RankwiseError(
            f"strategy {spec.name!r} needs metrics {missing}; pass stats from rankwise.analyze(model)"
        )


def allocate(
    strategy: str,
    stats: Sequence[LayerStats],
    budget: Budget,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_step: int = 1,
    **hparams,
) -> Allocation:
    """Run a registered allocator and verify its output against the budget and the rank grid."""
    spec = get_allocator(strategy)
    if spec.kind != "static":
        raise RankwiseError(f"strategy {strategy!r} is dynamic: it allocates during training, not up front")
    _check_hparams(spec, hparams)
    _check_stats(spec, stats)
    pattern = spec.fn(stats, budget, min_rank=min_rank, max_rank=max_rank, rank_step=rank_step, **hparams)
    infos = {s.name: s.info for s in stats}
    extra = sorted(set(pattern.ranks) - set(infos))
    if extra:
        raise RankwiseError(f"allocator {strategy!r} returned names that are not targets: {extra[:3]}")
    bounds = {s.name: rank_bounds(s.info, min_rank, max_rank, rank_step) for s in stats}
    for name, r in pattern.ranks.items():
        b = bounds[name]
        if r != 0 and not (b.lo <= r <= b.hi and r % b.step == 0):
            raise RankwiseError(f"allocator {strategy!r} gave {name} rank {r}, outside [{b.lo}, {b.hi}] step {b.step}")
    spent = pattern.spent(infos)
    if spent > budget.params:
        raise RankwiseError(f"allocator {strategy!r} spent {spent:,} > budget {budget.params:,}")
    adapted = [s.info for s in stats if pattern.ranks.get(s.name, 0) > 0]
    tol = smallest_step_cost(adapted, [bounds[a.name] for a in adapted]) if adapted else 0
    full = dict(spec.hparams, **hparams)
    return Allocation(strategy, pattern, budget, spent, tol, full)
