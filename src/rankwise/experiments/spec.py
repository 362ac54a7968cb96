"""An experiment file (YAML) -> a validated `Experiment` whose `runs()` are the grid's cells.

Everything that can be wrong with the file is found here, before any run starts, and reported as one line that
names the bad key: unknown keys, unknown strategies/methods/options, budgets no plan can meet, missing data.

    name: glue-minilm                 # optional
    base: {model: minilm, targets: all-linear, epochs: 1}   # `rankwise train` settings shared by every task
    tasks:
      sst2: {data: ../data/sst2, max_train_samples: 3000, metric: eval_accuracy,
             by_budget: {16: {lr: 5.0e-4}}}   # training settings that differ at one budget (base may hold one too)
    grid:
      methods: [uniform, {strategy: all}, {method: peft_eva, options: {rho: 2}}]
      budgets: [4, 16]                # int: the cost of uniform rank R on the targets; "300k": parameters
      seeds: [0, 1, 2]
    resources: {num_cpus: 2, num_gpus: 0}   # per run, for --launcher ray

Relative paths (data, model folders) resolve against the YAML file's folder; `$VAR`/`${VAR}` are expanded first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..types import RankwiseError

__all__ = ["Experiment", "MethodEntry", "Run", "load_experiment", "SETTINGS", "BUDGET_SETTINGS", "TOP_KEYS",
           "GRID_KEYS"]

TOP_KEYS = ("name", "description", "base", "tasks", "grid", "resources")
GRID_KEYS = ("methods", "budgets", "seeds")
ENTRY_KEYS = ("strategy", "method", "options", "label", "budgets")
RESOURCE_KEYS = ("num_cpus", "num_gpus")
# `rankwise train` settings an experiment may set (base or per task); each becomes --key-with-dashes, except
# train_args: {key: value} -> --train-arg key=value (any TrainingArguments field).
SETTINGS = ("model", "data", "task", "text_columns", "label_column", "validation_split", "max_train_samples",
            "max_eval_samples", "max_length", "targets", "lora_alpha", "lora_dropout", "dora", "rslora", "epochs",
            "lr", "batch_size", "max_steps", "device", "warmup_ratio", "weight_decay", "scheduler", "grad_accum",
            "eval_steps", "train_args", "pair_encoding")
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

    def canonical(self) -> dict:
        return {"kind": self.kind, "name": self.name, "options": self.options}


@dataclass(frozen=True)
class Run:
    """One cell of the grid: one `rankwise train` with its own run folder."""

    id: str
    task: str
    label: str
    entry: MethodEntry
    budget: int | str
    seed: int
    settings: dict  # resolved train settings (paths absolute)

    @property
    def budget_label(self) -> str:
        return f"r{self.budget}" if isinstance(self.budget, int) else f"b{self.budget}"

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
            for k, v in e.options.items():
                args += ["--set", f"{k}={_set_value(v)}"]
        else:
            args += ["--method", e.name, *budget]
            for k, v in e.options.items():
                args += ["--ranks", str(v)] if k == "ranks" else ["--set", f"{k}={_set_value(v)}"]
        return args

    def to_dict(self) -> dict:
        return {"id": self.id, "task": self.task, "label": self.label, "kind": self.entry.kind,
                "name": self.entry.name, "options": self.entry.options, "budget": self.budget, "seed": self.seed,
                "args": self.train_args()}


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


@dataclass
class Experiment:
    path: Path
    name: str
    description: str
    base: dict
    tasks: dict  # task name -> settings as written (base merged in)
    entries: list[MethodEntry]
    budgets: list
    seeds: list[int]
    resources: dict
    metrics: dict  # task -> headline metric name (or None: the report picks by task kind)
    text: str = ""
    by_budget: dict = field(default_factory=dict)  # task -> {budget: settings that differ at that budget}

    def settings_for(self, task: str, budget) -> dict:
        """The task's settings as written, with what `by_budget` changes at this budget."""
        from .validate import overlay

        return overlay(self.tasks[task], self.by_budget.get(task, {}).get(budget, {}))

    def runs(self) -> list[Run]:
        """Every cell: tasks x seeds x budgets x methods, tasks in file order. Ids hash the cell as written.

        Seeds and budgets run outside methods so that a sweep stopped part-way has already finished every method
        of the first seeds: its partial results are paired comparisons, not one method's seeds.
        """
        out = []
        for task in self.tasks:
            budgets = list(dict.fromkeys(b for e in self.entries for b in (e.budgets or self.budgets)))
            for seed in self.seeds:
                for budget in budgets:
                    # ids hash the settings this cell really trains with: a by_budget line renews only its cells
                    written = self.settings_for(task, budget)
                    resolved = resolve_settings(written, self.path.parent)
                    for e in self.entries:
                        if budget not in (e.budgets if e.budgets is not None else self.budgets):
                            continue
                        cell = {"task": task, "settings": _hashed(written), "entry": e.canonical(),
                                "budget": budget, "seed": seed}
                        digest = hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:8]
                        b = f"r{budget}" if isinstance(budget, int) else f"b{budget}"
                        rid = f"{task}-{e.label}-{b}-s{seed}-{digest}"
                        out.append(Run(rid, task, e.label, e, budget, seed, resolved))
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "path": str(self.path), "base": self.base,
                "tasks": self.tasks, "metrics": self.metrics,
                "by_budget": {t: {str(b): v for b, v in bb.items()} for t, bb in self.by_budget.items() if bb}, "budgets": self.budgets, "seeds": self.seeds,
                "methods": [dict(e.canonical(), label=e.label, budgets=e.budgets) for e in self.entries],
                "resources": self.resources}


def _expand(value, folder: Path, must_exist: bool) -> str:
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
    s["data"] = _expand(s["data"], folder, must_exist=True)
    s["model"] = _expand(s["model"], folder, must_exist=False)
    return s


def _read(path: Path) -> dict:
    import yaml

    from .validate import mapping

    if not path.is_file():
        raise RankwiseError(f"experiment file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise RankwiseError(f"{path} is not valid YAML: {first[:200]}") from None
    return mapping(raw, str(path))


def load_experiment(path: str | os.PathLike, *, check_budgets: bool = True) -> Experiment:
    """Read and validate an experiment file. Raises RankwiseError (one line, naming the key) on any problem."""
    from . import validate as v

    path = Path(path)
    raw = _read(path)
    v.check_keys(raw, TOP_KEYS, "")
    base = dict(v.mapping(raw.get("base"), "base"))
    v.check_keys(base, SETTINGS + ("by_budget",), "base")
    base_by_budget = base.pop("by_budget", None)
    tasks, metrics, task_by_budget = v.parse_tasks(raw.get("tasks"), base, path.parent.resolve())
    grid = v.mapping(raw.get("grid"), "grid")
    v.check_keys(grid, GRID_KEYS, "grid")
    for key in GRID_KEYS:
        if key not in grid:
            v.fail(f"grid.{key}", "missing")
    resources = dict(v.mapping(raw.get("resources"), "resources"))
    v.check_keys(resources, RESOURCE_KEYS, "resources")
    for k, val in resources.items():
        if isinstance(val, bool) or not isinstance(val, (int, float)) or val < 0:
            v.fail(f"resources.{k}", f"expected a number >= 0, got {val!r}")
    budgets = v.parse_budgets(grid["budgets"], "grid.budgets")
    entries = v.parse_entries(grid["methods"], "grid.methods", budgets)
    in_use = list(dict.fromkeys(b for e in entries for b in (e.budgets or budgets)))
    shared = v.parse_by_budget(base_by_budget, in_use, "base.by_budget")
    by_budget = {}
    for task, written in task_by_budget.items():
        own = v.parse_by_budget(written, in_use, f"tasks.{task}.by_budget")
        by_budget[task] = {b: v.overlay(shared.get(b, {}), own.get(b, {})) for b in [*shared, *own]}
    exp = Experiment(path=path.resolve(), name=str(raw.get("name") or path.parent.name),
                     description=str(raw.get("description") or ""), base=base, tasks=tasks, entries=entries,
                     budgets=budgets, seeds=v.parse_seeds(grid["seeds"], "grid.seeds"), resources=resources,
                     metrics=metrics, text=path.read_text(), by_budget=by_budget)
    if check_budgets:
        v.check_budgets_feasible(exp)
    return exp
