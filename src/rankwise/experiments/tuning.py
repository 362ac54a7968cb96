"""The tune: section: every method's settings chosen on held-out training rows, never on the reported split.

    tune:
      candidates: {lr: [5.0e-4, 1.0e-3, 2.0e-3, 4.0e-3]}   # tried for every tuned entry (a grid of them)
      methods:                     # grid labels tuned on their own, each optionally with its own candidates
        uniform: {}
        adalora: {lr: [1.0e-3, 2.0e-3, 4.0e-3, 8.0e-3], options.orth_reg_weight: [0.1, 0.3]}
      share: {spectral: [uniform, uniform_qv]}   # take the choice of the first tuned label that has the budget
      verify: {sst2: [gradient]}   # also tune these on their own on one task, to check the sharing assumption
      seeds: [0]                   # tuned on (default [0]); the score is the mean over them
      dev_samples: 500             # rows of each task's training file held out from every run (default 500)
      dev_seed: 0                  # which rows (default 0; never the run's seed)

A tuning cell trains like the grid cell it stands for (same data minus the held-out rows, same budget) and is
evaluated on the held-out rows with the task's metric; the best candidate (mean over the tuning seeds, ties to the
first listed) is chosen per (task, method, budget). Candidate keys are training settings that may differ by
budget (lr, epochs, lora_alpha, ...) or a method's options as `options.NAME`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from .cells import Run, _hashed, apply_values, cell_id
from .schema import BUDGET_SETTINGS, MethodEntry, resolve_settings
from .validate import check_keys, fail, mapping, parse_seeds

__all__ = ["TuneSpec", "parse_tune", "select", "TUNE_KEYS", "DEFAULT_DEV_SAMPLES"]

TUNE_KEYS = ("candidates", "methods", "share", "verify", "seeds", "dev_samples", "dev_seed")
DEFAULT_DEV_SAMPLES = 500


@dataclass
class TuneSpec:
    candidates: dict  # key -> values, for every tuned label
    methods: dict  # label -> its own candidates (overriding keys of `candidates`)
    share: dict  # label -> tuned labels whose choice it takes (the first that has the budget)
    verify: dict = field(default_factory=dict)  # task -> labels also tuned on their own there (a check)
    seeds: list = field(default_factory=lambda: [0])
    dev_samples: int = DEFAULT_DEV_SAMPLES
    dev_seed: int = 0
    budgets: dict = field(default_factory=dict)  # label -> its budgets in the grid

    def holdout(self) -> dict:
        return {"dev_samples": self.dev_samples, "dev_seed": self.dev_seed}

    def source(self, label: str, budget) -> str:
        """The tuned label whose choice `label` uses in the grid at `budget`."""
        for src in self.share.get(label, [label]):
            if budget in self.budgets.get(src, ()):
                return src
        return label  # parse_tune made sure some source has every budget of the label

    def grid_of(self, label: str) -> list[dict]:
        """Every combination of candidate values for a label, in the order written (the tie-break order)."""
        c = {**self.candidates, **self.methods.get(label, {})}
        keys = list(c)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(c[k] for k in keys))]

    def tuned_labels(self, task: str) -> list[str]:
        return list(dict.fromkeys([*self.methods, *self.verify.get(task, [])]))

    def cells(self, exp) -> list:
        """Tuning cells in run order: per task, per seed and budget, every candidate of every tuned label."""
        entries = {e.label: e for e in exp.entries}
        out = []
        for task in exp.tasks:
            labels = self.tuned_labels(task)
            for seed in self.seeds:
                for budget in exp.all_budgets():
                    for label in labels:
                        e: MethodEntry = entries[label]
                        if budget not in exp.budgets_of(e):
                            continue
                        for values in self.grid_of(label):
                            written = {**exp.cell_settings(task, e, budget), "eval_on": "dev"}
                            written, entry = apply_values(written, e, values)
                            cell = {"phase": "tune", "task": task, "settings": _hashed(written),
                                    "entry": entry.canonical(), "budget": budget, "seed": seed}
                            out.append(Run(cell_id(task, label, budget, seed, cell), task, label, entry, budget,
                                           seed, resolve_settings(written, exp.path.parent), phase="tune",
                                           candidate=values))
        return out

    def to_dict(self) -> dict:
        return {"candidates": self.candidates, "methods": self.methods, "share": self.share, "verify": self.verify,
                "seeds": self.seeds, "dev_samples": self.dev_samples, "dev_seed": self.dev_seed}


def _candidates(raw, where: str) -> dict:
    out = {}
    for key, values in mapping(raw, where).items():
        w = f"{where}.{key}"
        if not (key in BUDGET_SETTINGS or (isinstance(key, str) and key.startswith("options.") and len(key) > 8)):
            fail(w, f"not a tunable setting; allowed: {', '.join(BUDGET_SETTINGS)} or options.NAME (a method option)")
        if key == "train_args":
            fail(w, "train_args cannot be tuned as a whole; tune a setting such as lr")
        if not isinstance(values, list) or not values:
            fail(w, f"give a non-empty list of candidate values, got {values!r}")
        if len({repr(x) for x in values}) != len(values):
            fail(w, f"a candidate appears twice in {values}")
        if key in ("lr", "lora_alpha", "epochs") and not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                for x in values):
            fail(w, f"candidates must be positive numbers, got {values}")
        out[str(key)] = list(values)
    return out


def parse_tune(raw, exp) -> TuneSpec | None:
    """The tune: section, checked against the grid (every label named exists, every grid entry is covered)."""
    if raw is None:
        return None
    raw = mapping(raw, "tune")
    check_keys(raw, TUNE_KEYS, "tune")
    labels = [e.label for e in exp.entries]
    candidates = _candidates(raw.get("candidates"), "tune.candidates")
    methods = {}
    for label, own in mapping(raw.get("methods"), "tune.methods").items():
        if label not in labels:
            fail(f"tune.methods.{label}", f"not a label of grid.methods ({', '.join(labels)})")
        methods[str(label)] = _candidates(own, f"tune.methods.{label}")
        if not {**candidates, **methods[str(label)]}:
            fail(f"tune.methods.{label}", "nothing to tune: give candidates here or in tune.candidates")
    if not methods:
        fail("tune.methods", "name the grid labels tuned on their own, e.g. {uniform: {}}")
    budgets = {e.label: exp.budgets_of(e) for e in exp.entries}
    share = {}
    for label, sources in mapping(raw.get("share"), "tune.share").items():
        w = f"tune.share.{label}"
        if label not in labels:
            fail(w, f"not a label of grid.methods ({', '.join(labels)})")
        if label in methods:
            fail(w, "is tuned on its own (tune.methods); it cannot also share a choice")
        sources = [sources] if isinstance(sources, str) else sources
        if not isinstance(sources, list) or not sources:
            fail(w, f"give a tuned label or a list of them, got {sources!r}")
        for src in sources:
            if src not in methods:
                fail(w, f"{src!r} is not tuned (tune.methods: {', '.join(methods)})")
        uncovered = [b for b in budgets[label] if not any(b in budgets[src] for src in sources)]
        if uncovered:
            fail(w, f"none of {sources} runs at budget {uncovered[0]!r}; add a label that does")
        share[str(label)] = [str(x) for x in sources]
    missing = [x for x in labels if x not in methods and x not in share]
    if missing:
        fail("tune", f"grid entry {missing[0]!r} is neither tuned (tune.methods) nor shares a tuned choice "
                     "(tune.share): every compared method gets the same tuning effort")
    verify = {}
    for task, names in mapping(raw.get("verify"), "tune.verify").items():
        if task not in exp.tasks:
            fail(f"tune.verify.{task}", f"not a task ({', '.join(exp.tasks)})")
        if not isinstance(names, list) or not all(n in share for n in names):
            fail(f"tune.verify.{task}", f"give labels that share a choice (tune.share), got {names!r}")
        verify[str(task)] = list(names)
    seeds = parse_seeds(raw.get("seeds", [0]), "tune.seeds")
    n, dev_seed = raw.get("dev_samples", DEFAULT_DEV_SAMPLES), raw.get("dev_seed", 0)
    for key, value, lo in (("dev_samples", n, 1), ("dev_seed", dev_seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            fail(f"tune.{key}", f"must be an integer >= {lo}, got {value!r}")
    return TuneSpec(candidates, methods, share, verify, seeds, n, dev_seed, budgets)


def select(spec: TuneSpec, cells: list, scores: dict, metric_of, lower_is_better) -> tuple[dict, list[dict]]:
    """(choices {(task, label, budget): values}, the tuning table) from finished tuning cells.

    `scores` maps a cell id to its eval dict ({"failed": True} for a cell that failed: its candidate is never
    chosen); `metric_of(task, evals)` names the metric. A (task, label, budget) is chosen only when every one of
    its cells has an outcome; the table lists every candidate with its mean score over the tuning seeds."""
    groups: dict = {}
    for c in cells:
        groups.setdefault((c.task, c.label, c.budget), []).append(c)
    choices, table = {}, []
    for (task, label, budget), group in groups.items():
        evals = [scores[c.id] for c in group if c.id in scores and not scores[c.id].get("failed")]
        metric = metric_of(task, evals) if evals else None
        by_values: dict = {}
        for c in group:
            by_values.setdefault(repr(sorted(c.candidate.items())), (c.candidate, []))[1].append(c)
        rows = []
        complete = all(c.id in scores for c in group)
        for values, runs in by_values.values():
            outcomes = [scores.get(c.id) for c in runs]
            failed = any(o is not None and o.get("failed") for o in outcomes)
            got = [o.get(metric) for o in outcomes if o is not None and not o.get("failed")]
            ok = not failed and len(got) == len(runs) and all(isinstance(x, (int, float)) for x in got)
            rows.append({"task": task, "label": label, "budget": budget, "values": values, "metric": metric,
                         "score": sum(got) / len(got) if ok else None, "failed": failed,
                         "seeds": [c.seed for c in runs], "runs": [c.id for c in runs]})
        scored = [i for i, r in enumerate(rows) if r["score"] is not None]
        if complete and scored:
            sign = -1 if lower_is_better(metric) else 1
            best = max(scored, key=lambda i: (sign * rows[i]["score"], -i))  # ties: the first listed
            rows[best]["chosen"] = True
            choices[(task, label, budget)] = rows[best]["values"]
        table += rows
    return choices, table
