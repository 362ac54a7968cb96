"""Validation of an experiment file: every check that must fail before any run starts, one line each.

Each helper names the key it reads (`where`) so that the error points at the line of YAML to fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..types import RankwiseError
from ..training.pairs import PAIR_ENCODINGS
from .schema import (_COMMON_RANK, _LABEL_RE, _NOT_IN_ALL, _TASK_ONLY, BUDGET_SETTINGS, ENTRY_KEYS, SETTINGS,
                     MethodEntry, resolve_settings)
from .schema import expand as _expand

__all__ = ["check_budgets_feasible", "parse_budgets", "parse_by_budget", "parse_entries", "parse_seeds",
           "parse_tasks", "fail", "mapping", "check_keys", "overlay"]


def fail(where: str, msg: str):
    raise RankwiseError(f"{where}: {msg}")


def mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        fail(where, f"expected a mapping (key: value), got {type(value).__name__}")
    return value


def check_keys(d: dict, allowed, where: str) -> None:
    for k in d:
        if k not in allowed:
            fail(f"{where}.{k}" if where else str(k), f"unknown key; allowed: {', '.join(allowed)}")


def parse_entries(raw, where: str, default_budgets: list) -> list[MethodEntry]:
    from ..allocators import get_allocator, list_allocators
    from ..methods import get_method

    if not isinstance(raw, list) or not raw:
        fail(where, "give a non-empty list of strategies or methods, e.g. [uniform, spectral, {method: peft_eva}]")
    out: list[MethodEntry] = []
    # `strategy: all` means every static allocator not listed on its own line (so `[uniform, {strategy: all}]`
    # keeps uniform once, with its own options and label)
    listed = {x if isinstance(x, str) else x.get("strategy") for x in raw if isinstance(x, (str, dict))}
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        if isinstance(item, str):
            item = {"method": item} if _is_method(item) else {"strategy": item}
        item = mapping(item, w)
        check_keys(item, ENTRY_KEYS, w)
        if ("strategy" in item) == ("method" in item):
            fail(w, "give exactly one of strategy: NAME or method: NAME")
        options = dict(mapping(item.get("options"), f"{w}.options"))
        budgets = parse_budgets(item["budgets"], f"{w}.budgets") if "budgets" in item else None
        targets = _entry_targets(item, budgets or default_budgets, w)
        if "strategy" in item:
            names = [s.name for s in list_allocators() if s.kind == "static" and s.name not in listed
                     and s.name not in _NOT_IN_ALL] \
                if item["strategy"] == "all" else [str(item["strategy"])]
            for name in names:
                try:
                    spec = get_allocator(name)
                except RankwiseError as e:
                    fail(f"{w}.strategy", str(e))
                if spec.kind != "static":
                    fail(f"{w}.strategy", f"{name!r} allocates during training; use its method instead")
                if item["strategy"] == "all":  # options of `all` apply where a strategy takes them
                    opts = {k: v for k, v in options.items() if k in spec.hparams or k in _COMMON_RANK}
                else:
                    opts = options
                    bad = sorted(set(opts) - set(spec.hparams) - set(_COMMON_RANK))
                    if bad:
                        allowed = ", ".join([*spec.hparams, *_COMMON_RANK])
                        fail(f"{w}.options.{bad[0]}", f"strategy {name!r} has no such option; allowed: {allowed}")
                label = item.get("label") if len(names) == 1 and item.get("label") else name
                out.append(MethodEntry("strategy", name, opts, str(label), budgets, targets))
        else:
            name = str(item["method"])
            try:
                method = get_method(name)
            except RankwiseError as e:
                fail(f"{w}.method", str(e))
            if name == "lora":
                fail(f"{w}.method", "plain LoRA is `strategy: uniform` (or any strategy) in the grid")
            _check_method_options(method, options, budgets or default_budgets, f"{w}.options")
            out.append(MethodEntry("method", name, options, str(item.get("label") or name), budgets, targets))
    labels = [e.label for e in out]
    for e in out:
        if not _LABEL_RE.match(e.label):
            fail(where, f"label {e.label!r} may hold letters, digits and _ . + - only")
        if labels.count(e.label) > 1:
            fail(where, f"{e.label!r} appears twice; give one of them a label: NAME")
    return out


def _entry_targets(item: dict, budgets: list, w: str) -> tuple | None:
    """An entry's own targets (e.g. uniform on query value): only where every budget is a parameter count, so
    that it spends what the other entries spend, not what its own rank R would cost on fewer layers."""
    if "targets" not in item:
        return None
    raw = item["targets"]
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        fail(f"{w}.targets", f"give target module names, e.g. [query, value], or all-linear; got {raw!r}")
    ranks = [b for b in budgets if not isinstance(b, str) or b.strip().endswith("%")]
    if ranks:
        fail(f"{w}.targets", f"an entry with its own targets needs budgets in parameters (e.g. '41472'), not "
                             f"{ranks[0]!r}: a budget rank or share would price other layers than the rest")
    return tuple(names)


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
            fail(where, str(e))


def parse_budgets(raw, where: str) -> list:
    from ..allocators import parse_budget

    if not isinstance(raw, list) or not raw:
        fail(where, "give a non-empty list: ints are budget ranks (4 = what uniform r=4 costs), strings are "
                     "parameters ('300k', '1.2M', '0.5%')")
    out = []
    for b in raw:
        if isinstance(b, bool) or not isinstance(b, (int, str)) or (isinstance(b, int) and b < 1):
            fail(where, f"budget {b!r} is neither a rank >= 1 nor a parameter count like '300k'")
        if isinstance(b, str) and not b.strip().endswith("%"):
            try:
                parse_budget(b)
            except RankwiseError as e:
                fail(where, str(e))
        out.append(b)
    if len(set(map(str, out))) != len(out):
        fail(where, f"a budget appears twice in {out}")
    return out


def parse_seeds(raw, where: str) -> list[int]:
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        fail(where, f"give a non-empty list of integers, got {raw!r}")
    if len(set(raw)) != len(raw):
        fail(where, f"a seed appears twice in {raw}")
    return list(raw)


def overlay(settings: dict, over: dict) -> dict:
    """`settings` with `over` laid on top: train_args merge field by field (a task or budget that sets one field
    keeps the others); every other setting is replaced. The one rule for base -> task -> budget."""
    out = dict(settings)
    for k, val in over.items():
        both = k == "train_args" and isinstance(val, dict) and isinstance(out.get(k), dict)
        out[k] = {**out[k], **val} if both else val
    return out


def parse_tasks(raw, base: dict, folder: Path) -> tuple[dict, dict, dict]:
    """(settings per task with base merged in, headline metric per task, `by_budget` per task as written)."""
    raw = mapping(raw, "tasks")
    if not raw:
        fail("tasks", "give at least one task, e.g. tasks: {sst2: {data: ../data/sst2}}")
    tasks, metrics, by_budget = {}, {}, {}
    for name, settings in raw.items():
        w = f"tasks.{name}"
        if not _LABEL_RE.match(str(name)):
            fail(w, "task names may hold letters, digits and _ . + - only")
        settings = dict(mapping(settings, w))
        check_keys(settings, SETTINGS + _TASK_ONLY + ("by_budget",), w)
        by_budget[str(name)] = mapping(settings.pop("by_budget", None), f"{w}.by_budget")
        merged = overlay(base, settings)
        if not isinstance(merged.get("train_args", {}), dict):
            fail(f"{w}.train_args", "must be a mapping of TrainingArguments fields, e.g. {logging_steps: 5}")
        if merged.get("pair_encoding", "joint") not in PAIR_ENCODINGS:
            fail(f"{w}.pair_encoding", f"must be one of {', '.join(PAIR_ENCODINGS)}, got {merged['pair_encoding']!r}")
        for key in ("model", "data"):
            if merged.get(key) in (None, ""):
                fail(f"{w}.{key}", "missing (set it here or in base)")
        data = _expand(merged["data"], folder, must_exist=True)
        if not Path(data).exists() and not _online_id(str(merged["data"])):
            fail(f"{w}.data", f"{merged['data']} does not exist (relative paths resolve against {folder})")
        tasks[str(name)] = merged
        metrics[str(name)] = settings.get("metric")
    return tasks, metrics, by_budget


def parse_by_budget(raw, budgets: list, where: str) -> dict:
    """`by_budget: {16: {lr: 5.0e-4}}`: training settings that differ at one budget of the grid.

    A larger rank often wants a smaller learning rate, and one setting for every budget would leave one of them
    badly tuned. Only training settings may differ: what defines the budget (model, targets) and the data may not,
    or the budgets would stop being comparable.
    """
    out = {}
    for b, over in mapping(raw, where).items():
        w = f"{where}.{b}"
        if b not in budgets:
            fail(w, f"{b!r} is not a budget of the grid; budgets: {budgets}")
        over = mapping(over, w)
        check_keys(over, BUDGET_SETTINGS, w)
        if not isinstance(over.get("train_args", {}), dict):
            fail(f"{w}.train_args", "must be a mapping of TrainingArguments fields, e.g. {logging_steps: 5}")
        out[b] = dict(over)
    return out


def _online_id(value: str) -> bool:
    """A hub id like nyu-mll/glue:sst2 is allowed only when the hub may be reached."""
    return os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "") and ":" in value and not value.startswith(".")


def check_budgets_feasible(exp) -> None:
    """Every budget must be payable on every task's targets with every strategy's rank bounds (shapes only)."""
    from ..allocators import feasible_range, parse_budget, rank_bounds

    from .skeleton import layers_of, model_params

    for task, written in exp.tasks.items():
        s = resolve_settings(written, exp.path.parent)
        for e in exp.entries:
            try:
                layers = layers_of(s["model"], list(e.targets) if e.targets is not None else s.get("targets"))
            except RankwiseError as err:
                fail(f"tasks.{task}.model" if e.targets is None else f"grid.methods ({e.label}).targets", str(err))
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
                    fail(where, str(err))
                lo, hi = feasible_range(layers, bounds)
                if _may_leave_layers_out(e, opts):  # below rank 1 on every layer some layers get rank 0
                    lo = min(lo, min(lay.params_per_rank for lay in layers))
                if not lo <= budget.params <= hi:
                    fail(where, f"{budget.params:,} parameters cannot be met on {len(layers)} target layers "
                                 f"(feasible {lo:,} .. {hi:,})")




def _may_leave_layers_out(e: MethodEntry, opts: dict) -> bool:
    """Allocators other than uniform (at the default min_rank) and AdaLoRA may give layers rank 0."""
    if e.kind == "method":
        return e.name == "adalora"
    return e.name != "uniform" and opts.get("min_rank", 1) == 1
