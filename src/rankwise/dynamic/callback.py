"""How AdaLoRA hooks into Hugging Face `Trainer`: the allocation callback and the orthogonal regulariser.

- `AllocationCallback` runs the stepper at `on_optimizer_step`: after the optimizer step, before `zero_grad`, so
  the gradients are the ones the step used (all-reduced under DDP, summed over gradient accumulation) and it runs
  once per optimizer step. `on_step_end` would be too late: the gradients are gone.
- `OrthRegulariser` adds `weight * mean_i ||P_i P_i^T - I||_F` and `||Q_i^T Q_i - I||_F` to the training loss
  through a forward hook on the model, so it runs inside DDP's forward and with any Trainer. Unlike peft's
  `AdaLoraModel.forward` it is vectorised (one batched matmul per parameter shape) and it leaves evaluation losses
  alone (peft adds it whenever a loss is computed, which would inflate eval loss and perplexity).
- `PenaltyLog` keeps the penalty out of the logged training loss: each logged `loss` becomes the task loss, and the
  weighted penalty of the same steps is logged beside it as `orth_penalty`, so AdaLoRA's `train_loss` compares
  with LoRA's.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import TrainerCallback

from .schedule import Schedule
from .stepper import Stepper

__all__ = ["AllocationCallback", "OrthRegulariser", "PenaltyLog"]


class AllocationCallback(TrainerCallback):
    """Calls `stepper.step(global_step + 1)` once per optimizer step. `make_schedule(total_step)` is re-run at
    train begin with the trainer's own step count (it differs from the planned one under several processes)."""

    def __init__(self, stepper: Stepper, make_schedule: Callable[[int], Schedule]):
        self.stepper = stepper
        self.make_schedule = make_schedule

    def on_train_begin(self, args, state, control, **kwargs):
        current = self.stepper.schedule
        if state.max_steps and (current is None or current.total_step != state.max_steps):
            self.stepper.bind(self.make_schedule(int(state.max_steps)))

    def on_optimizer_step(self, args, state, control, **kwargs):
        # global_step counts the optimizer steps finished before this one (the Trainer increments it afterwards)
        self.stepper.step(int(state.global_step) + 1)


class OrthRegulariser:
    """`weight * (sum ||P P^T - I|| + sum ||Q^T Q - I||) / (number of P and Q matrices)`, peft's formula, with
    same-shaped matrices stacked so each shape costs one batched matmul."""

    def __init__(self, As: list[torch.Tensor], Bs: list[torch.Tensor], weight: float):
        self.weight = float(weight)
        self.count = len(As) + len(Bs)
        self._groups = _by_shape(As, transpose=False) + _by_shape(Bs, transpose=True)
        # weighted penalties added to training losses: since the last log, and over the whole run
        self._since, self._since_n, self._total, self._total_n = 0.0, 0, 0.0, 0

    def __call__(self) -> torch.Tensor:
        total = 0.0
        for mats, transpose in self._groups:
            m = torch.stack(mats)
            if transpose:
                m = m.transpose(1, 2)
            gram = m @ m.transpose(1, 2)
            eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
            total = total + torch.linalg.matrix_norm(gram - eye).sum()
        return total / max(self.count, 1)

    def hook(self, module, args, output):
        """Forward hook: adds the weighted penalty to a training loss; evaluation outputs pass unchanged."""
        # a tuple output (return_dict=False) cannot say whether its first item is a loss: left alone
        if not module.training or self.weight == 0 or getattr(output, "loss", None) is None:
            return output
        penalty = self.weight * self()
        value = float(penalty.detach())
        self._since, self._since_n = self._since + value, self._since_n + 1
        self._total, self._total_n = self._total + value, self._total_n + 1
        output["loss"] = output["loss"] + penalty
        return output

    def take_mean(self) -> float:
        """Mean weighted penalty of the training forwards since the last call (each micro-batch's loss weighs the
        same in Trainer's logged loss, so this is the penalty's share of it)."""
        mean = self._since / self._since_n if self._since_n else 0.0
        self._since, self._since_n = 0.0, 0
        return mean

    def mean_total(self) -> float:
        """Mean weighted penalty over every training forward of the run."""
        return self._total / self._total_n if self._total_n else 0.0


class PenaltyLog(TrainerCallback):
    """Rewrites each logged training `loss` as the task loss and logs the penalty beside it (`orth_penalty`)."""

    def __init__(self, regulariser: OrthRegulariser):
        self.reg = regulariser

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = state.log_history[-1] if state.log_history else {}
        if logs is None or "loss" not in logs or "loss" not in entry:
            return
        penalty = self.reg.take_mean()
        entry["loss"] = float(entry["loss"]) - penalty  # Trainer.log appended this entry just before on_log
        entry["orth_penalty"] = penalty
        logs["loss"], logs["orth_penalty"] = entry["loss"], penalty


def _by_shape(mats: list[torch.Tensor], transpose: bool) -> list[tuple[list[torch.Tensor], bool]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for m in mats:
        if m.numel():  # a rank-0 layer has nothing to keep orthogonal
            groups.setdefault(tuple(m.shape), []).append(m)
    return [(g, transpose) for g in groups.values()]
