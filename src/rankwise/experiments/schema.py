"""The experiment file's vocabulary: its keys, what a grid entry is, and how written paths resolve.

Shared by `spec` (the Experiment and its runs), `validate` (the checks) and `tuning` (the tune: section), so that
none of them imports another's internals (no import circle).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TOP_KEYS", "GRID_KEYS", "ENTRY_KEYS", "RESOURCE_KEYS", "SETTINGS", "BUDGET_SETTINGS", "MethodEntry",
           "resolve_settings", "expand"]

TOP_KEYS = ("name", "description", "base", "tasks", "grid", "resources", "tune")
GRID_KEYS = ("methods", "budgets", "seeds")
ENTRY_KEYS = ("strategy", "method", "options", "label", "budgets", "targets")
RESOURCE_KEYS = ("num_cpus", "num_gpus")
# `rankwise train` settings an experiment may set (base or per task); each becomes --key-with-dashes, except
# train_args: {key: value} -> --train-arg key=value (any TrainingArguments field).
SETTINGS = ("model", "data", "task", "text_columns", "label_column", "validation_split", "max_train_samples",
            "max_eval_samples", "max_length", "targets", "lora_alpha", "lora_dropout", "dora", "rslora", "epochs",
            "lr", "batch_size", "max_steps", "device", "warmup_ratio", "weight_decay", "scheduler", "grad_accum",
            "eval_steps", "train_args", "pair_encoding", "dev_samples", "dev_seed")
# What `by_budget` may change at one budget: training settings only, never the model, targets or data.
BUDGET_SETTINGS = ("epochs", "lr", "batch_size", "max_steps", "warmup_ratio", "weight_decay", "scheduler",
                   "grad_accum", "lora_alpha", "lora_dropout", "train_args")
_TASK_ONLY = ("metric",)  # read by the report (the task's headline metric), never passed to train
_COMMON_RANK = ("min_rank", "max_rank", "rank_step")  # passed as strategy options through --set
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
# Strategies `strategy: all` leaves out: they need a finished run's ranks (`rankwise plan --from-run`), which no
# grid cell has. List them explicitly with their options if you mean them.
_NOT_IN_ALL = ("discovered",)


@dataclass(frozen=True)
class MethodEntry:
    """One line of grid.methods: a static allocator (`strategy`) or a training method (`method`)."""

    kind: str  # "strategy" | "method"
    name: str
    options: dict = field(default_factory=dict)
    label: str = ""
    budgets: tuple | None = None  # overrides grid.budgets for this entry
    targets: tuple | None = None  # overrides the task's targets (budgets in parameters only)

    def canonical(self) -> dict:
        out = {"kind": self.kind, "name": self.name, "options": self.options}
        if self.targets is not None:  # only when set: ids of entries without it stay as they were
            out["targets"] = list(self.targets)
        return out


def expand(value, folder: Path, must_exist: bool) -> str:
    text = os.path.expandvars(str(value))
    p = Path(text)
    if not p.is_absolute():
        cand = folder / p
        if must_exist or cand.exists():
            return str(cand.resolve())
    return text


def resolve_settings(written: dict, folder: Path) -> dict:
    """Settings with data (and a model given as a folder) resolved against the experiment file's folder."""
    s = {k: v for k, v in written.items() if k not in _TASK_ONLY}
    s["data"] = expand(s["data"], folder, must_exist=True)
    s["model"] = expand(s["model"], folder, must_exist=False)
    return s


