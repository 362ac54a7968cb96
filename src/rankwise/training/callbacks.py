"""Trainer callbacks of every run: progress on stderr (stdout carries only the result JSON), and a log line at
each checkpoint so the loss curve survives a kill and a resume."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm
from transformers.trainer_callback import ProgressCallback, TrainerCallback

__all__ = ["StderrProgress", "LogAtSaves"]


class _ToStderr:
    """Stands in for the progress bar while ProgressCallback writes a log dict (tqdm.write goes to stdout)."""

    @staticmethod
    def write(text: str) -> None:
        tqdm.write(text, file=sys.stderr)


class StderrProgress(ProgressCallback):
    """Trainer's progress bar (already on stderr) with its loss dicts moved to stderr too."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = self.training_bar
        if bar is None:
            return
        self.training_bar = _ToStderr()
        try:
            super().on_log(args, state, control, logs=logs, **kwargs)
        finally:
            self.training_bar = bar


class LogAtSaves(TrainerCallback):
    """Log the running loss at every checkpoint and at the last step: loss_curve then covers every step, and a
    resumed run's train_loss (the step-weighted mean of the curve) counts the steps before the kill too."""

    def on_step_end(self, args, state, control, **kwargs):
        saving = args.save_strategy == "steps" and state.save_steps and state.global_step % state.save_steps == 0
        if saving or state.global_step >= state.max_steps:
            control.should_log = True
        return control
