"""DECIDE: pure allocators from layer stats + an exact parameter budget to a rank pattern.

Importing this package registers the built-in strategies; third-party code adds its own with
`@register_allocator("name", description=...)`.
"""

from . import data, discovered, heuristic, spectral, uniform  # noqa: F401  (registration side effect)
from .budget import feasible_range, fit_ranks, parse_budget, pattern_from_weights, rank_bounds
from .registry import (Allocation, AllocatorSpec, allocate, check_strategy, get_allocator, list_allocators,
                       register_allocator)

__all__ = [
    "Allocation",
    "AllocatorSpec",
    "allocate",
    "check_strategy",
    "get_allocator",
    "list_allocators",
    "register_allocator",
    "parse_budget",
    "fit_ranks",
    "feasible_range",
    "rank_bounds",
    "pattern_from_weights",
]
