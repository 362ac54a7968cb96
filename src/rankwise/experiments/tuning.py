"""The tune: section: every method's settings chosen on held-out training rows, never on the reported split.

    tune:
      candidates: {lr: [5.0e-4, 1.0e-3, 2.0e-3, 4.0e-3]}   # tried for every tuned entry (a grid of them)
      methods:                     # grid labels tuned on their own, each optionally with its own candidates
        uniform: {}
        adalora: {lr: [1.0e-3, 2.0e-3, 4.0e-3, 8.0e-3], options.orth_reg_weight: [0.1, 0.3]}
      share: {spectral: [uniform, uniform_qv]}   # take the choice of the first tuned label that has the budget
      # (or [uniform, own]: uniform's choice where uniform runs, tuned on its own at the other budgets)
      verify: {sst2: [gradient]}   # also tune these on their own on one task, to check the sharing assumption
      seeds: [0]                   # tuned on (default [0]); the score is the mean over them
      dev_samples: 500             # rows of each task's training file held out from every run (default 500)
      dev_seed: 0                  # which rows (default 0; never the run's seed)
      extend: {lr: 2}              # when the best value is the first or last tried, try the next one beyond it
                                   # (the list's own spacing), up to 2 more per side (default: none)

A tuning cell trains like the grid cell it stands for (same data minus the held-out rows, same budget) and is
evaluated on the held-out rows with the task's metric; the best candidate (mean over the tuning seeds, ties to the
first listed) is chosen per (task, method, budget). Candidate keys are training settings that may differ by
budget (lr, epochs, lora_alpha, ...) or a method's options as `options.NAME`.

A best value at the edge of its list says the optimum may lie beyond it (AdaLoRA's rates on STS-B rose to the
last of four at every budget). `extend` then adds the next value in the same spacing (4e-3 after 2e-3, 4e-3:
8e-3; 2.5e-4 below 5e-4, 1e-3) for that (task, method, budget) alone, and again while it wins, up to the limit;
the same rule for every tuned method, so each gets the same chance to find its optimum. Extension cells are known
only once the cells before them have finished (`tuning_cells` recomputes them from the results on disk).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from .cells import Run, _hashed, apply_values, cell_id
from .schema import BUDGET_SETTINGS, MethodEntry, resolve_settings
from .validate import check_keys, fail, mapping, parse_seeds

__all__ = ["TuneSpec", "parse_tune", "select", "tuning_cells", "tuning_state", "TUNE_KEYS", "DEFAULT_DEV_SAMPLES",
           "FAILED", "OWN"]

TUNE_KEYS = ("candidates", "methods", "share", "verify", "seeds", "dev_samples", "dev_seed", "extend")
DEFAULT_DEV_SAMPLES = 500
FAILED = ".failed.json"  # beside a tuning cell that failed: its candidate scores worst; delete it to retry
# Last in a share list: at the budgets no label before it runs, the sharing label is tuned on its own. Below rank 1
# the static allocators cannot take uniform's choice, and q,v's (another placement of the rank) need not fit them.
OWN = "own"


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
    extend: dict = field(default_factory=dict)  # key -> how many values beyond each end of its list may be added

    def holdout(self) -> dict:
        return {"dev_samples": self.dev_samples, "dev_seed": self.dev_seed}

    def source(self, label: str, budget) -> str:
        """The tuned label whose choice `label` uses in the grid at `budget` (`label` itself where it is tuned on
        its own there)."""
        for src in self.share.get(label, [label]):
            if src == OWN:
                return label
            if budget in self.budgets.get(src, ()):
                return src
        return label  # parse_tune made sure some source has every budget of the label

    def grid_of(self, label: str) -> list[dict]:
        """Every combination of candidate values for a label, in the order written (the tie-break order)."""
        c = {**self.candidates, **self.methods.get(label, {})}
        keys = list(c)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(c[k] for k in keys))]

    def tunes(self, task: str, label: str, budget) -> bool:
        """Whether `label` has tuning cells at `budget`: its grid uses its own choice there, or it is verified."""
        return self.source(label, budget) == label or label in self.verify.get(task, ())

    def cells(self, exp) -> list:
        """Tuning cells in run order: per task, per seed and budget, every candidate of every entry tuned there
        (in grid order)."""
        out = []
        for task in exp.tasks:
            for seed in self.seeds:
                for budget in exp.all_budgets():
                    for e in exp.entries:
                        if budget not in exp.budgets_of(e) or not self.tunes(task, e.label, budget):
                            continue
                        out += [self._cell(exp, task, e, budget, seed, values) for values in self.grid_of(e.label)]
        return out

    def _cell(self, exp, task: str, e: MethodEntry, budget, seed: int, values: dict) -> Run:
        written = {**exp.cell_settings(task, e, budget), "eval_on": "dev"}
        written, entry = apply_values(written, e, values)
        cell = {"phase": "tune", "task": task, "settings": _hashed(written), "entry": entry.canonical(),
                "budget": budget, "seed": seed}
        return Run(cell_id(task, e.label, budget, seed, cell), task, e.label, entry, budget, seed,
                   resolve_settings(written, exp.path.parent), phase="tune", candidate=values)

    def extensions(self, exp, cells: list, choices: dict) -> list:
        """Cells to add where a chosen value of an `extend` key is the first or last tried (with the other keys
        as chosen) and fewer than the limit lie beyond that end of the written list: the next value, spaced as
        the last two tried, for every tuning seed."""
        entries = {e.label: e for e in exp.entries}
        new = []
        for (task, label, budget), best in choices.items():
            for key, limit in self.extend.items():
                if key not in best:
                    continue
                others = {k: v for k, v in best.items() if k != key}
                tried = sorted({c.candidate[key] for c in cells if (c.task, c.label, c.budget) == (task, label, budget)
                                and all(c.candidate.get(k) == v for k, v in others.items())})
                written = {**self.candidates, **self.methods.get(label, {})}.get(key) or [best[key]]
                for edge, near, beyond in ((tried[-1], tried[-2:-1], [v for v in tried if v > max(written)]),
                                           (tried[0], tried[1:2], [v for v in tried if v < min(written)])):
                    if best[key] != edge or not near or len(beyond) >= limit:
                        continue
                    value = _next_value(edge, near[0])
                    new += [self._cell(exp, task, entries[label], budget, seed, {**best, key: value})
                            for seed in self.seeds]
        return new

    def to_dict(self) -> dict:
        return {"candidates": self.candidates, "methods": self.methods, "share": self.share, "verify": self.verify,
                "seeds": self.seeds, "dev_samples": self.dev_samples, "dev_seed": self.dev_seed,
                **({"extend": self.extend} if self.extend else {})}


def _next_value(edge, near):
    """One step beyond `edge`, away from `near`, in their ratio (2e-3, 4e-3 -> 8e-3), rounded to 6 digits so that
    the value written into the cell (and its id) does not carry float noise; whole numbers stay whole."""
    value = edge * (edge / near)
    if isinstance(edge, int) and isinstance(near, int):
        return int(round(value)) if int(round(value)) != edge else edge + (edge - near)
    return float(f"{value:.6g}")


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
    if OWN in labels and raw.get("share"):
        fail(f"grid.methods.{OWN}", f"{OWN!r} is a keyword of tune.share (tuned on its own); give the entry another "
                                    "label")
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
        for i, src in enumerate(sources):
            if src == OWN and i != len(sources) - 1:
                fail(w, f"{OWN!r} must come last: the labels after it would never be used")
            if src not in methods and src != OWN:
                fail(w, f"{src!r} is not tuned (tune.methods: {', '.join(methods)}), nor {OWN!r} (tuned on its own "
                        "where no label before it runs)")
        if OWN in sources and not candidates:
            fail(w, f"{OWN!r} tunes the label over tune.candidates, which is empty; give candidates there")
        uncovered = [b for b in budgets[label] if OWN not in sources and not any(b in budgets[src] for src in sources)]
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
    extend = _extend(raw.get("extend"), candidates, methods)
    seeds = parse_seeds(raw.get("seeds", [0]), "tune.seeds")
    n, dev_seed = raw.get("dev_samples", DEFAULT_DEV_SAMPLES), raw.get("dev_seed", 0)
    for key, value, lo in (("dev_samples", n, 1), ("dev_seed", dev_seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            fail(f"tune.{key}", f"must be an integer >= {lo}, got {value!r}")
    return TuneSpec(candidates, methods, share, verify, seeds, n, dev_seed, budgets, extend)


def _extend(raw, candidates: dict, methods: dict) -> dict:
    """tune.extend: {key: how many values beyond each end}, for tuned keys whose candidates are positive numbers,
    at least two for every method that tunes the key (the next value continues their spacing)."""
    out = {}
    for key, limit in mapping(raw, "tune.extend").items():
        w = f"tune.extend.{key}"
        lists = [own.get(key, candidates.get(key)) for own in methods.values()]
        lists = [x for x in lists if x is not None]
        if not lists:
            tuned = dict.fromkeys([*candidates, *(k for own in methods.values() for k in own)])
            fail(w, f"not a tuned key (tuned: {', '.join(tuned)})")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            fail(w, f"give how many values may be added beyond each end (an integer >= 0), got {limit!r}")
        for values in lists:
            if len(values) < 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                                          for x in values):
                fail(w, f"needs at least two positive numbers to continue their spacing, got {values}")
        out[str(key)] = limit
    return out


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


# ----- state on disk: which tuning cells exist, which finished, what they chose -----------------------------------

def tuning_cells(exp, out) -> tuple[list, dict, list[dict]]:
    """(every tuning cell, extensions included, the choices, the tuning table) from the results in `out`.
    Extensions depend on results: add them while finished cells call for more (each is known once the cells
    before it have finished; the ids hash the values, so a resumed sweep finds the same cells)."""
    from .results import LOWER_IS_BETTER, headline_metric

    cells = exp.tuning_runs()
    while True:
        if exp.tune is None:
            return cells, {}, []
        choices, table = select(exp.tune, cells, _scores_on_disk(cells, out),
                                lambda t, evals: headline_metric(t, evals, exp.metrics), lambda m: m in LOWER_IS_BETTER)
        known = {c.id for c in cells}
        new = [c for c in exp.tune.extensions(exp, cells, choices) if c.id not in known]
        if not new:
            return cells, choices, table
        cells = cells + list({c.id: c for c in new}.values())


def tuning_state(exp, out) -> tuple[dict, list[dict]]:
    """(choices, tuning table) from the tuning cells finished (or failed for good) in `out`."""
    return tuning_cells(exp, out)[1:]


def _scores_on_disk(cells: list, out) -> dict:
    """Run id -> its held-out eval dict for each finished cell; {"failed": True} for one that failed for good
    (it diverged at this value: the worst score)."""
    from pathlib import Path

    from .results import is_finished, load_results

    scores = {}
    for run in cells:
        d = Path(out) / run.folder / run.id
        if is_finished(d):
            scores[run.id] = load_results(d)["eval"]
        elif (Path(out) / run.folder / f"{run.id}{FAILED}").is_file():
            scores[run.id] = {"failed": True}
    return scores
