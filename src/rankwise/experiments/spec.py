"""An experiment file (YAML) -> a validated `Experiment` whose `runs()` are the grid's cells.

Everything that can be wrong with the file is found here, before any run starts, and reported as one line that
names the bad key: unknown keys, unknown strategies/methods/options, budgets no plan can meet, missing data.

    name: glue-minilm                 # optional
    base: {model: minilm, targets: all-linear, epochs: 1}   # `rankwise train` settings shared by every task
    tasks:
      sst2: {data: ../data/sst2, max_train_samples: 3000, metric: eval_accuracy}
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

__all__ = ["Experiment", "MethodEntry", "Run", "load_experiment", "SETTINGS", "TOP_KEYS", "GRID_KEYS"]

TOP_KEYS = ("name", "description", "base", "tasks", "grid", "resources")
GRID_KEYS = ("methods", "budgets", "seeds")
ENTRY_KEYS = ("strategy", "method", "options", "label", "budgets")
RESOURCE_KEYS = ("num_cpus", "num_gpus")
# `rankwise train` settings an experiment may set (base or per task); each becomes --key-with-dashes.
SETTINGS = ("model", "data", "task", "text_columns", "label_column", "validation_split", "max_train_samples",
            "max_eval_samples", "max_length", "targets", "lora_alpha", "lora_dropout", "dora", "rslora", "epochs",
            "lr", "batch_size", "max_steps", "device", "warmup_ratio", "weight_decay", "scheduler", "grad_accum",
            "train_args")  # train_args: {key: value} -> --train-arg key=value (any TrainingArguments field)
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

    def runs(self) -> list[Run]:
        """Every cell: tasks x seeds x budgets x methods, tasks in file order. Ids hash the cell as written.

        Seeds and budgets run outside methods so that a sweep stopped part-way has already finished every method
        of the first seeds: its partial results are paired comparisons, not one method's seeds.
        """
        out = []
        for task, written in self.tasks.items():
            resolved = resolve_settings(written, self.path.parent)
            budgets = list(dict.fromkeys(b for e in self.entries for b in (e.budgets or self.budgets)))
            for seed in self.seeds:
                for budget in budgets:
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
                "tasks": self.tasks, "metrics": self.metrics, "budgets": self.budgets, "seeds": self.seeds,
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


# ----- validation ------------------------------------------------------------------------------------------------

def _fail(where: str, msg: str):
    raise RankwiseError(f"{where}: {msg}")


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(where, f"expected a mapping (key: value), got {type(value).__name__}")
    return value


def _check_keys(d: dict, allowed, where: str) -> None:
    for k in d:
        if k not in allowed:
            _fail(f"{where}.{k}" if where else str(k), f"unknown key; allowed: {', '.join(allowed)}")


def _entries(raw, where: str, default_budgets: list) -> list[MethodEntry]:
    from ..allocators import get_allocator, list_allocators
    from ..methods import get_method

    if not isinstance(raw, list) or not raw:
        _fail(where, "give a non-empty list of strategies or methods, e.g. [uniform, spectral, {method: peft_eva}]")
    out: list[MethodEntry] = []
    # `strategy: all` means every static allocator not listed on its own line (so `[uniform, {strategy: all}]`
    # keeps uniform once, with its own options and label)
    listed = {x if isinstance(x, str) else x.get("strategy") for x in raw if isinstance(x, (str, dict))}
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        if isinstance(item, str):
            item = {"method": item} if _is_method(item) else {"strategy": item}
        item = _mapping(item, w)
        _check_keys(item, ENTRY_KEYS, w)
        if ("strategy" in item) == ("method" in item):
            _fail(w, "give exactly one of strategy: NAME or method: NAME")
        options = dict(_mapping(item.get("options"), f"{w}.options"))
        budgets = _budgets(item["budgets"], f"{w}.budgets") if "budgets" in item else None
        if "strategy" in item:
            names = [s.name for s in list_allocators() if s.kind == "static" and s.name not in listed
                     and s.name not in _NOT_IN_ALL] \
                if item["strategy"] == "all" else [str(item["strategy"])]
            for name in names:
                try:
                    spec = get_allocator(name)
                except RankwiseError as e:
                    _fail(f"{w}.strategy", str(e))
                if spec.kind != "static":
                    _fail(f"{w}.strategy", f"{name!r} allocates during training; use its method instead")
                if item["strategy"] == "all":  # options of `all` apply where a strategy takes them
                    opts = {k: v for k, v in options.items() if k in spec.hparams or k in _COMMON_RANK}
                else:
                    opts = options
                    bad = sorted(set(opts) - set(spec.hparams) - set(_COMMON_RANK))
                    if bad:
                        allowed = ", ".join([*spec.hparams, *_COMMON_RANK])
                        _fail(f"{w}.options.{bad[0]}", f"strategy {name!r} has no such option; allowed: {allowed}")
                label = item.get("label") if len(names) == 1 and item.get("label") else name
                out.append(MethodEntry("strategy", name, opts, str(label), budgets))
        else:
            name = str(item["method"])
            try:
                method = get_method(name)
            except RankwiseError as e:
                _fail(f"{w}.method", str(e))
            if name == "lora":
                _fail(f"{w}.method", "plain LoRA is `strategy: uniform` (or any strategy) in the grid")
            _check_method_options(method, options, budgets or default_budgets, f"{w}.options")
            out.append(MethodEntry("method", name, options, str(item.get("label") or name), budgets))
    labels = [e.label for e in out]
    for e in out:
        if not _LABEL_RE.match(e.label):
            _fail(where, f"label {e.label!r} may hold letters, digits and _ . + - only")
        if labels.count(e.label) > 1:
            _fail(where, f"{e.label!r} appears twice; give one of them a label: NAME")
    return out


def _is_method(name: str) -> bool:
    from ..methods import list_methods

    return name in {m.name for m in list_methods()} and name != "lora"


def _check_method_options(method, options: dict, budgets: list, where: str) -> None:
    """The method's own check, as `rankwise train` will call it, once per budget of the entry."""
    opts = {k: v for k, v in options.items() if k != "ranks"}
    if "ranks" in options:
        opts["ranks"] = str(options["ranks"])
    for b in budgets:
        choice = {"budget_rank": b, "budget": None} if isinstance(b, int) else {"budget": b, "budget_rank": None}
        try:
            method.check(dict(opts), {**choice, "targets": None, "strategy_options": None})
        except RankwiseError as e:
            _fail(where, str(e))


def _budgets(raw, where: str) -> list:
    from ..allocators import parse_budget

    if not isinstance(raw, list) or not raw:
        _fail(where, "give a non-empty list: ints are budget ranks (4 = what uniform r=4 costs), strings are "
                     "parameters ('300k', '1.2M', '0.5%')")
    out = []
    for b in raw:
        if isinstance(b, bool) or not isinstance(b, (int, str)) or (isinstance(b, int) and b < 1):
            _fail(where, f"budget {b!r} is neither a rank >= 1 nor a parameter count like '300k'")
        if isinstance(b, str) and not b.strip().endswith("%"):
            try:
                parse_budget(b)
            except RankwiseError as e:
                _fail(where, str(e))
        out.append(b)
    if len(set(map(str, out))) != len(out):
        _fail(where, f"a budget appears twice in {out}")
    return out


def _seeds(raw, where: str) -> list[int]:
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        _fail(where, f"give a non-empty list of integers, got {raw!r}")
    if len(set(raw)) != len(raw):
        _fail(where, f"a seed appears twice in {raw}")
    return list(raw)


def _tasks(raw, base: dict, folder: Path) -> tuple[dict, dict]:
    raw = _mapping(raw, "tasks")
    if not raw:
        _fail("tasks", "give at least one task, e.g. tasks: {sst2: {data: ../data/sst2}}")
    tasks, metrics = {}, {}
    for name, settings in raw.items():
        w = f"tasks.{name}"
        if not _LABEL_RE.match(str(name)):
            _fail(w, "task names may hold letters, digits and _ . + - only")
        settings = _mapping(settings, w)
        _check_keys(settings, SETTINGS + _TASK_ONLY, w)
        merged = {**base, **settings}
        if not isinstance(merged.get("train_args", {}), dict):
            _fail(f"{w}.train_args", "must be a mapping of TrainingArguments fields, e.g. {logging_steps: 5}")
        for key in ("model", "data"):
            if merged.get(key) in (None, ""):
                _fail(f"{w}.{key}", "missing (set it here or in base)")
        data = _expand(merged["data"], folder, must_exist=True)
        if not Path(data).exists() and not _online_id(str(merged["data"])):
            _fail(f"{w}.data", f"{merged['data']} does not exist (relative paths resolve against {folder})")
        tasks[str(name)] = merged
        metrics[str(name)] = settings.get("metric")
    return tasks, metrics


def _online_id(value: str) -> bool:
    """A hub id like nyu-mll/glue:sst2 is allowed only when the hub may be reached."""
    return os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "") and ":" in value and not value.startswith(".")


def _check_budgets_feasible(exp: Experiment) -> None:
    """Every budget must be payable on every task's targets with every strategy's rank bounds (shapes only)."""
    from ..allocators import feasible_range, parse_budget, rank_bounds

    from .skeleton import layers_of, model_params

    for task, written in exp.tasks.items():
        s = resolve_settings(written, exp.path.parent)
        try:
            layers = layers_of(s["model"], s.get("targets"))
        except RankwiseError as e:
            _fail(f"tasks.{task}.model", str(e))
        for e in exp.entries:
            opts = {k: e.options.get(k) for k in _COMMON_RANK if k in e.options} if e.kind == "strategy" else {}
            for b in (e.budgets if e.budgets is not None else exp.budgets):
                where = f"grid.budgets ({b!r} for {e.label} on {task})"
                try:
                    total = model_params(s["model"]) if isinstance(b, str) and b.strip().endswith("%") else None
                    budget = parse_budget(None if isinstance(b, int) else b, layers, total_params=total,
                                          budget_rank=b if isinstance(b, int) else None)
                    bounds = [rank_bounds(lay, opts.get("min_rank", 1), opts.get("max_rank"),
                                          opts.get("rank_step", 1)) for lay in layers]
                except RankwiseError as err:
                    _fail(where, str(err))
                lo, hi = feasible_range(layers, bounds)
                if not lo <= budget.params <= hi:
                    _fail(where, f"{budget.params:,} parameters cannot be met on {len(layers)} target layers "
                                 f"(feasible {lo:,} .. {hi:,})")


def load_experiment(path: str | os.PathLike, *, check_budgets: bool = True) -> Experiment:
    """Read and validate an experiment file. Raises RankwiseError (one line, naming the key) on any problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RankwiseError(f"experiment file {path} does not exist")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise RankwiseError(f"{path} is not valid YAML: {first[:200]}") from None
    raw = _mapping(raw, str(path))
    _check_keys(raw, TOP_KEYS, "")
    base = dict(_mapping(raw.get("base"), "base"))
    _check_keys(base, SETTINGS, "base")
    tasks, metrics = _tasks(raw.get("tasks"), base, path.parent.resolve())
    grid = _mapping(raw.get("grid"), "grid")
    _check_keys(grid, GRID_KEYS, "grid")
    for key in GRID_KEYS:
        if key not in grid:
            _fail(f"grid.{key}", "missing")
    resources = dict(_mapping(raw.get("resources"), "resources"))
    _check_keys(resources, RESOURCE_KEYS, "resources")
    for k, v in resources.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            _fail(f"resources.{k}", f"expected a number >= 0, got {v!r}")
    budgets = _budgets(grid["budgets"], "grid.budgets")
    exp = Experiment(path=path.resolve(), name=str(raw.get("name") or path.parent.name),
                     description=str(raw.get("description") or ""), base=base, tasks=tasks,
                     entries=_entries(grid["methods"], "grid.methods", budgets), budgets=budgets,
                     seeds=_seeds(grid["seeds"], "grid.seeds"), resources=resources, metrics=metrics, text=text)
    if check_budgets:
        _check_budgets_feasible(exp)
    return exp
