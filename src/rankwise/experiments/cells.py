"""One cell of an experiment (a grid or tuning run) and how its `rankwise train` arguments and id are made."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..types import RankwiseError
from . import validate as v
from .schema import _TASK_ONLY, MethodEntry

__all__ = ["Run", "apply_values", "budget_label", "cell_id"]


@dataclass(frozen=True)
class Run:
    """One cell: one `rankwise train` with its own run folder (`phase` tune: OUT/tuning/, grid: OUT/runs/)."""

    id: str
    task: str
    label: str
    entry: MethodEntry
    budget: int | str
    seed: int
    settings: dict  # resolved train settings (paths absolute)
    phase: str = "grid"  # "tune": a candidate evaluated on held-out training rows; "grid": a reported cell
    candidate: dict = field(default_factory=dict)  # tune: the values tried; grid: the values chosen by tuning
    pending: bool = False  # grid cell whose tuned settings are not chosen yet (its id is not final)

    @property
    def budget_label(self) -> str:
        return budget_label(self.budget)

    @property
    def folder(self) -> str:
        return "tuning" if self.phase == "tune" else "runs"

    def train_args(self) -> list[str]:
        """`rankwise train` arguments, without --out."""
        s = dict(self.settings)
        args = [str(s.pop("model")), "--data", str(s.pop("data")), "--seed", str(self.seed)]
        for key, value in s.items():
            args += _flag(key, value)
        e = self.entry
        budget = ["--budget-rank", str(self.budget)] if isinstance(self.budget, int) else ["--budget", self.budget]
        if e.kind == "strategy":
            args += ["--strategy", e.name, *budget]
            for k, val in e.options.items():
                args += ["--set", f"{k}={_set_value(val)}"]
        else:
            args += ["--method", e.name, *budget]
            for k, val in e.options.items():
                args += ["--ranks", str(val)] if k == "ranks" else ["--set", f"{k}={_set_value(val)}"]
        return args

    def to_dict(self) -> dict:
        out = {"id": self.id, "task": self.task, "label": self.label, "kind": self.entry.kind,
               "name": self.entry.name, "options": self.entry.options, "budget": self.budget, "seed": self.seed,
               "args": self.train_args()}
        if self.entry.targets is not None:
            out["targets"] = list(self.entry.targets)
        if self.phase != "grid" or self.candidate:
            out.update(phase=self.phase, candidate=self.candidate)
        return out


def budget_label(budget) -> str:
    return f"r{budget}" if isinstance(budget, int) else f"b{budget}"


def cell_id(task: str, label: str, budget, seed: int, cell: dict) -> str:
    """`task-label-budget-sSEED-hash`: the hash covers the cell as written, so editing a setting renews it."""
    digest = hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:8]
    return f"{task}-{label}-{budget_label(budget)}-s{seed}-{digest}"


def apply_values(written: dict, entry: MethodEntry, values: dict) -> tuple[dict, MethodEntry]:
    """Settings and entry with tuned values laid on: `options.NAME` keys go to the method's options."""
    from dataclasses import replace

    opts = {k.split(".", 1)[1]: val for k, val in values.items() if k.startswith("options.")}
    plain = {k: val for k, val in values.items() if not k.startswith("options.")}
    entry = replace(entry, options={**entry.options, **opts}) if opts else entry
    return v.overlay(written, plain), entry


def _hashed(written: dict) -> dict:
    """What a run id hashes: the settings as written (stable across machines), report-only keys left out."""
    return {k: v for k, v in written.items() if k not in _TASK_ONLY}


def _flag(key: str, value) -> list[str]:
    if key == "train_args":
        if not isinstance(value, dict):
            raise RankwiseError(f"train_args must be a mapping of TrainingArguments fields, got {value!r}")
        return [a for k, v in value.items() for a in ("--train-arg", f"{k}={_set_value(v)}")]
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else []
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def _set_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)
