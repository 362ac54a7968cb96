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

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..types import RankwiseError
from . import validate as v
from .cells import Run, _hashed, apply_values, budget_label, cell_id
from .schema import (BUDGET_SETTINGS, GRID_KEYS, RESOURCE_KEYS, SETTINGS, TOP_KEYS, MethodEntry,
                     resolve_settings)

__all__ = ["Experiment", "MethodEntry", "Run", "load_experiment", "apply_values", "budget_label", "cell_id",
           "SETTINGS", "BUDGET_SETTINGS", "TOP_KEYS", "GRID_KEYS"]


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
    tune: object = None  # TuneSpec | None  # the tune: section (experiments/tuning.py)

    def settings_for(self, task: str, budget) -> dict:
        """The task's settings as written, with what `by_budget` changes at this budget."""
        return v.overlay(self.tasks[task], self.by_budget.get(task, {}).get(budget, {}))

    def budgets_of(self, entry: MethodEntry) -> list:
        return list(entry.budgets if entry.budgets is not None else self.budgets)

    def all_budgets(self) -> list:
        return list(dict.fromkeys(b for e in self.entries for b in self.budgets_of(e)))

    def cell_settings(self, task: str, entry: MethodEntry, budget) -> dict:
        """The settings a cell trains with, as written: task, by_budget, the entry's targets, the held-out rows."""
        written = self.settings_for(task, budget)
        if entry.targets is not None:
            written = {**written, "targets": list(entry.targets)}
        if self.tune is not None:  # no run of the grid trains on the rows the settings are chosen on
            written = {**written, **self.tune.holdout()}
        return written

    def runs(self, choices: dict | None = None) -> list[Run]:
        """Every grid cell: tasks x seeds x budgets x methods, tasks in file order. Ids hash the cell as written.

        Seeds and budgets run outside methods so that a sweep stopped part-way has already finished every method
        of the first seeds: its partial results are paired comparisons, not one method's seeds. With a tune:
        section, `choices` ({(task, label, budget): values}) are laid on each cell; a cell whose choice is not
        made yet is `pending` (its settings, and so its id, are known once its tuning cells have finished).
        """
        out = []
        for task in self.tasks:
            for seed in self.seeds:
                for budget in self.all_budgets():
                    for e in self.entries:
                        if budget not in self.budgets_of(e):
                            continue
                        out.append(self._grid_cell(task, e, budget, seed, choices))
        return out

    def _grid_cell(self, task: str, e: MethodEntry, budget, seed: int, choices: dict | None) -> Run:
        written = self.cell_settings(task, e, budget)
        chosen, pending = {}, False
        if self.tune is not None:
            key = (task, self.tune.source(e.label, budget), budget)
            pending = choices is None or key not in choices
            chosen = {} if pending else dict(choices[key])
        written, entry = apply_values(written, e, chosen)
        resolved = resolve_settings(written, self.path.parent)
        cell = {"task": task, "settings": _hashed(written), "entry": entry.canonical(), "budget": budget,
                "seed": seed}
        rid = "pending" if pending else cell_id(task, e.label, budget, seed, cell)
        return Run(rid, task, e.label, entry, budget, seed, resolved, candidate=chosen, pending=pending)

    def tuning_runs(self) -> list[Run]:
        """The tune: section's cells (none without one): each candidate on the held-out rows, per task first."""
        return [] if self.tune is None else self.tune.cells(self)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "path": str(self.path), "base": self.base,
                "tasks": self.tasks, "metrics": self.metrics,
                "by_budget": {t: {str(b): v for b, v in bb.items()} for t, bb in self.by_budget.items() if bb}, "budgets": self.budgets, "seeds": self.seeds,
                "methods": [dict(e.canonical(), label=e.label, budgets=e.budgets) for e in self.entries],
                "resources": self.resources, **({"tune": self.tune.to_dict()} if self.tune is not None else {})}


def _read(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise RankwiseError(f"experiment file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise RankwiseError(f"{path} is not valid YAML: {first[:200]}") from None
    return v.mapping(raw, str(path))


def load_experiment(path: str | os.PathLike, *, check_budgets: bool = True) -> Experiment:
    """Read and validate an experiment file. Raises RankwiseError (one line, naming the key) on any problem."""
    from .tuning import parse_tune

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
    exp.tune = parse_tune(raw.get("tune"), exp)
    if check_budgets:
        v.check_budgets_feasible(exp)
    return exp
