"""DYNAMIC rank allocation during training (AdaLoRA): pure scoring/schedule pieces, one vectorised stepper, the
Trainer hooks, and the `adalora` training method (registered on import of `rankwise.dynamic.method`)."""

from .importance import element_scores, ema_update, importance, mask, select, threshold, triplet_scores
from .schedule import Schedule, budget_schedule, default_schedule, phase
from .stepper import Slot, Stepper

__all__ = ["Schedule", "Slot", "Stepper", "budget_schedule", "default_schedule", "element_scores", "ema_update",
           "importance", "mask", "phase", "select", "threshold", "triplet_scores"]
