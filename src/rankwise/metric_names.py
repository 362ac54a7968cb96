"""Names of the metrics a calibration pass measures on data, without the pass itself.

The allocators register which metrics they need when rankwise starts (`rankwise strategies` lists them); reading
the names from stats/calibration.py, which imports torch, made every command that only lists or checks
strategies pay seconds of imports. calibration.py re-exports them.
"""

from __future__ import annotations

__all__ = ["ACTIVATION_METRICS", "GRADIENT_METRICS", "DATA_METRICS", "EVR_PREFIX", "evr_key", "is_data_metric"]

ACTIVATION_METRICS = ("act_in_norm2", "act_out_norm2", "act_effective_rank", "act_explained_topk")
GRADIENT_METRICS = ("grad_norm", "grad_sensitivity", "grad_stable_rank")
DATA_METRICS = ACTIVATION_METRICS + GRADIENT_METRICS
EVR_PREFIX = "act_evr_"  # act_evr_1 .. act_evr_K: explained-variance ratio of the i-th input direction


def evr_key(i: int) -> str:
    """Metric name of the explained-variance ratio of the i-th (1-based) largest input direction."""
    return f"{EVR_PREFIX}{i}"


def is_data_metric(name: str) -> bool:
    return name in DATA_METRICS or name.startswith(EVR_PREFIX)
