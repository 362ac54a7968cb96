"""`rankwise paper`: the numbers, tables and figures of the paper in `paper/`, generated from committed sweeps.

Every number the paper quotes is a LaTeX macro in `numbers.tex`, one per figure, each line carrying a key
(`study|task|budget|method|quantity`) that says what it is, so a test can recompute it from the results.json files
alone. The statistics are the report's (`build_cells`: means, paired t intervals, Holm); this module adds the
power of each comparison (the smallest difference it could have detected) and the aggregates the prose quotes.
Tables use the macros too, so checking `numbers.tex` checks them. Figures are drawn by figures.py / plots.py.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections import Counter
from pathlib import Path

from ..types import RankwiseError
from .paper_tex import (Numbers, _better, _f, _fp, _tex, _word, cell_table, dynamic_tables, macro_name, mde_paired,
                        summary_table)
from .report import REFERENCE, REFERENCES, build_cells, reference_of
from .results import collect, read_manifest

__all__ = ["make_paper", "macro_name", "mde_paired", "load_study", "STUDIES", "V2_STUDY", "HOLM_LEVEL"]

STUDIES = ("studies/glue-minilm", "studies/smollm2-alpaca")
V2_STUDY = "studies/glue-minilm-v2"
HOLM_LEVEL = 0.05
_SHORT = {"glue-minilm": "Glue", "smollm2-alpaca": "Smol", "glue-minilm-v2": "GlueVtwo"}
class Study:
    """A sweep folder as the paper sees it: its finished runs, cells and manifest."""

    def __init__(self, root: Path, tolerance: float):
        self.root = Path(root)
        self.name = self.root.name
        self.short = _SHORT.get(self.name, _word(self.name))
        self.runs, self.notes = collect(self.root)
        self.manifest = read_manifest(self.root) or {}
        # a tuned sweep lists a grid cell only once its settings are chosen: the rest count as pending
        pending = int((self.manifest.get("tuning") or {}).get("pending_grid_runs", 0))
        self.total = len(self.manifest.get("runs", [])) + pending or len(self.runs)
        exp = self.manifest.get("experiment") or {}
        self.experiment = exp
        self.kinds = {m.get("label"): m.get("kind") for m in exp.get("methods", [])}
        self.cells = build_cells(self.runs, exp.get("metrics") or {}, tolerance) if self.runs else []
        self.tasks = list(dict.fromkeys(c.task for c in self.cells))

    def is_allocator(self, label: str) -> bool:
        """Where the rank goes at a fixed parameter count: static allocators and multi-rank LoRA. The baselines
        (uniform, uniform on query/value: the common default placement) are not allocators."""
        return label not in REFERENCES and (self.kinds.get(label) == "strategy" or label == "multirank")

    def cell(self, task, budget, label):
        return next((c for c in self.cells if (c.task, c.budget, c.label) == (task, budget, label)), None)

    def ref(self, task, budget):
        """The cell the others of this task and budget are compared with, by the report's rule (uniform, else
        uniform_qv: uniform over every linear layer cannot run below rank 1), or None."""
        return reference_of([c for c in self.cells if (c.task, c.budget) == (task, budget)])

    def task_runs(self, task) -> tuple[int, int]:
        """(finished, grid) runs of one task. The grid is counted from the experiment (seeds x each method's
        budgets), since sweep.json does not list a tuned task's cells until their settings are chosen."""
        exp, listed = self.experiment, sum(row["task"] == task for row in self.manifest.get("runs", []))
        budgets = exp.get("budgets") or []
        grid = len(exp.get("seeds") or []) * sum(len(budgets if m.get("budgets") is None else m["budgets"])
                                                 for m in exp.get("methods", []))
        return sum(r.task == task for r in self.runs), max(grid, listed)

    def only(self, tasks) -> "Study":
        """The study as far as `tasks` go (cells and runs of other tasks left out); Holm's family is per task, so
        a task's statistics are the same as in the whole study."""
        view = copy.copy(self)
        view.tasks = [t for t in self.tasks if t in tasks]
        view.cells = [c for c in self.cells if c.task in tasks]
        view.runs = [r for r in self.runs if r.task in tasks]
        return view


def load_study(root, tolerance: float = 0.02) -> Study:
    return Study(Path(root), tolerance)


def _diffs(s: Study, c) -> list[float]:
    ref = {r.seed: float(r.eval[c.metric]) for r in s.ref(c.task, c.budget).runs}
    return [float(r.eval[c.metric]) - ref[r.seed] for r in c.runs if r.seed in ref]


def _cell_numbers(num: Numbers, s: Study) -> None:
    for c in s.cells:
        a = (s.short, s.name, c.task, c.budget, c.label)
        num.add(*a, "mean", _f(c.mean))
        num.add(*a, "std", _f(c.std))
        num.add(*a, "seeds", str(c.n))
        num.add(*a, "params", f"{c.lora_params:,}")
        if c.cmp is None:
            continue
        d = _diffs(s, c)
        mde = mde_paired(statistics.stdev(d), len(d)) if len(d) > 1 else math.nan
        num.add(*a, "delta", _f(c.cmp["diff"], sign=True))
        num.add(*a, "deltapts", _f(100 * c.cmp["diff"], 1, sign=True))
        num.add(*a, "lo", _f(c.cmp["lo"], sign=True))
        num.add(*a, "hi", _f(c.cmp["hi"], sign=True))
        num.add(*a, "p", _fp(c.cmp["p"]))
        num.add(*a, "pholm", _fp(c.cmp.get("p_holm", math.nan)))
        num.add(*a, "mde", _f(mde))
        num.add(*a, "mdepts", _f(100 * mde, 1))
        ref = s.ref(c.task, c.budget)
        num.add(*a, "pct", _f(100 * c.cmp["diff"] / ref.mean, 2, sign=True))


def _task_numbers(num: Numbers, s: Study) -> None:
    for task in s.tasks:
        tc = [c for c in s.cells if c.task == task]
        a = (s.short, s.name, task)
        cmp_ = [c for c in tc if c.cmp is not None]
        alloc = [c for c in cmp_ if s.is_allocator(c.label)]
        for label, group in (("all", cmp_), ("alloc", alloc)):
            num.add(*a, "*", label, "compared", str(len(group)))
            num.add(*a, "*", label, "better", str(sum(_better(c) > 0 for c in group)))
            num.add(*a, "*", label, "worse", str(sum(_better(c) < 0 for c in group)))
            num.add(*a, "*", label, "holm", str(sum(c.cmp.get("p_holm", 1) < HOLM_LEVEL for c in group)))
        mdes = [100 * mde_paired(statistics.stdev(d), len(d)) for d in (_diffs(s, c) for c in alloc) if len(d) > 1]
        mdes = [m for m in mdes if not math.isnan(m)]
        if mdes:
            num.add(*a, "*", "alloc", "mdemedianpts", _f(statistics.median(mdes), 1))
            num.add(*a, "*", "alloc", "mdeminpts", _f(min(mdes), 1))
            num.add(*a, "*", "alloc", "mdemaxpts", _f(max(mdes), 1))
        first = tc[0].runs[0]
        num.add(*a, "*", "*", "evaln", f"{int(first.eval.get('num_samples', 0)):,}")
        num.add(*a, "*", "*", "trainn", f"{int(first.train_info.get('train_samples', 0)):,}")
        num.add(*a, "*", "*", "steps", str(int(first.train_info.get("steps", 0))))
        walls = [float(r.train_info["wall_time_s"]) for c in tc for r in c.runs]
        num.add(*a, "*", "*", "wallmedian", f"{statistics.median(walls):.0f}")
        # what the largest budget gains over the smallest, for uniform itself (paired by seed): uniform_qv, the
        # reference where uniform cannot run, places rank differently, so a gain from it would mix the two
        budgets = [b for b in dict.fromkeys(c.budget for c in tc) if s.cell(task, b, REFERENCE)]
        if len(budgets) > 1:
            lo, hi = s.cell(task, budgets[0], REFERENCE), s.cell(task, budgets[-1], REFERENCE)
            by = {r.seed: float(r.eval[lo.metric]) for r in lo.runs}
            d = [float(r.eval[hi.metric]) - by[r.seed] for r in hi.runs if r.seed in by]
            gain = sum(d) / len(d)
            num.add(*a, f"{budgets[-1]}-{budgets[0]}", REFERENCE, "delta", _f(gain, sign=True))
            num.add(*a, f"{budgets[-1]}-{budgets[0]}", REFERENCE, "deltapts", _f(100 * gain, 1, sign=True))
            num.add(*a, f"{budgets[-1]}-{budgets[0]}", REFERENCE, "pct", _f(100 * gain / lo.mean, 2, sign=True))
            for c in (c for c in tc if c.budget == budgets[0] and c.cmp is not None and s.is_allocator(c.label)):
                num.add(s.short, s.name, task, c.budget, c.label, "shareofgain", _f(c.cmp["diff"] / gain, 2))


def _study_numbers(num: Numbers, s: Study) -> None:
    a = (s.short, s.name, "*", "*", "*")
    num.add(*a, "runs", str(len(s.runs)))
    num.add(*a, "runstotal", str(s.total))
    num.add(*a, "cells", str(len(s.cells)))
    num.add(*a, "tasks", str(len(s.tasks)))
    num.add(*a, "methods", str(len({c.label for c in s.cells})))
    num.add(*a, "allocators", str(len({c.label for c in s.cells if s.kinds.get(c.label) == "strategy"} - {REFERENCE})))
    num.add(*a, "budgets", str(len({c.budget for c in s.cells})))
    num.add(*a, "seedsmax", str(max(c.n for c in s.cells)))
    plans = [r.dir / "plan.json" for r in s.runs if (r.dir / "plan.json").is_file()]
    if plans:
        import json

        num.add(*a, "alphafactor", f"{json.loads(plans[0].read_text())['alpha_factor']:g}")
    num.add(*a, "wallhours", _f(sum(float(r.train_info["wall_time_s"]) for r in s.runs) / 3600, 1))
    for label in ("all", "alloc"):
        for q in ("compared", "better", "worse", "holm"):
            total = sum(int(num.rows[macro_name(s.short, t, label, q)][0]) for t in s.tasks)
            num.add(s.short, s.name, "*", "*", label, q, str(total))
    _provenance_numbers(num, s)
    _refused_numbers(num, s)


def _provenance_numbers(num: Numbers, s: Study) -> None:
    """The machines and library versions the study's runs recorded (the appendix quotes v1's; v2's section its
    own, also while it runs)."""
    num.add(s.short, s.name, "*", "*", "*", "machines", _tex(_machines(s.runs)))
    num.add(s.short, s.name, "*", "*", "*", "versions", _tex(_versions(s.runs)))


def _machines(runs) -> str:
    def where(r):
        hw = r.run_info.get("hardware") or {}
        return hw.get("gpu") or (f"CPU, {hw['cpus']} cores" if hw.get("cpus") else "CPU, machine not recorded")

    return "; ".join(f"{n} runs on {w}" for w, n in sorted(Counter(where(r) for r in runs).items()))


def _versions(runs) -> str:
    def v(r):
        return ", ".join(f"{k} {x}" for k, x in sorted(r.run_info.get("versions", {}).items()))

    return "; ".join(f"{n} runs: {w}" for w, n in sorted(Counter(v(r) for r in runs).items()))


def _refused_numbers(num: Numbers, s: Study) -> None:
    """How far each method that the report refused to compare strayed from its reference's budget (min, max %)."""
    for label in sorted({c.label for c in s.cells if c.refused and c.label != REFERENCE}):
        devs = []
        for c in (c for c in s.cells if c.label == label):
            ref = s.ref(c.task, c.budget)
            if ref is None or ref is c:
                continue
            by = {r.seed: r.lora_params for r in ref.runs}
            devs += [100 * (r.lora_params - by[r.seed]) / by[r.seed] for r in c.runs if r.seed in by]
        if devs:
            num.add(s.short, s.name, "*", "*", label, "budgetdevmin", _f(min(devs), 1, sign=True))
            num.add(s.short, s.name, "*", "*", label, "budgetdevmax", _f(max(devs), 1, sign=True))


def _is_attention(name: str) -> bool:
    return "attention" in name or "attn" in name


def _dynamic_numbers(num: Numbers, s: Study) -> list[str]:
    """AdaLoRA's final ranks and multi-rank LoRA's discovered ranks, per task and budget; returns table rows."""
    rows = []
    for c in (c for c in s.cells if c.label == "adalora"):
        a = (s.short, s.name, c.task, c.budget, c.label)
        infos = [r.results.get("method_info") or {} for r in c.runs]
        ranks = [v for i in infos for v in (i.get("final_ranks") or {}).values()]
        attn = [v for i in infos for k, v in (i.get("final_ranks") or {}).items() if _is_attention(k)]
        ffn = [v for i in infos for k, v in (i.get("final_ranks") or {}).items() if not _is_attention(k)]
        if not ranks:
            continue
        m = [num.add(*a, "initrank", str(int(c.runs[0].run_info["adapter"]["init_rank"]))),
             num.add(*a, "peakparams", f"{round(sum(int(i['peak_params']) for i in infos) / len(infos)):,}"),
             num.add(*a, "params", f"{c.lora_params:,}"),
             num.add(*a, "rankmin", str(min(ranks))), num.add(*a, "rankmax", str(max(ranks))),
             num.add(*a, "rankattn", _f(sum(attn) / len(attn), 2) if attn else "--"),
             num.add(*a, "rankffn", _f(sum(ffn) / len(ffn), 2) if ffn else "--"),
             num.add(*a, "zerolayers", str(sum(int(i.get("layers_pruned_to_zero", 0)) for i in infos)))]
        rows.append(("adalora", c, m))
    for c in (c for c in s.cells if c.label == "multirank"):
        a = (s.short, s.name, c.task, c.budget, c.label)
        infos = [r.results.get("method_info") or {} for r in c.runs]
        if not all("mean_effective_rank" in i for i in infos):
            continue
        branches = "+".join(str(x) for x in c.runs[0].run_info["adapter"].get("ranks", []))
        m = [num.add(*a, "branches", branches),
             num.add(*a, "effrank", _f(sum(i["mean_effective_rank"] for i in infos) / len(infos), 2)),
             num.add(*a, "ranksum", _f(sum(i["mean_rank_sum"] for i in infos) / len(infos), 2)),
             num.add(*a, "energy", _f(float(infos[0].get("energy", math.nan)), 2))]
        rows.append(("multirank", c, m))
    return rows


def _v2_section(num: Numbers, root: Path, tolerance: float, out: Path, figures: bool) -> str:
    """Study v2's section: every table and the figure when all its runs are in; while it runs, the table of each
    task whose grid is finished and the count of runs of the others."""
    short, name = _SHORT["glue-minilm-v2"], root.name
    manifest = read_manifest(root) if root.is_dir() else None
    if manifest is None:
        num.add(short, name, "*", "*", "*", "runs", "0")
        return (r"Study v2 (\texttt{" + _tex("studies/" + root.name) + r"}) has not started in this checkout: "
                + "\\" + macro_name(short, "runs") + r"{} runs. This section is regenerated by \texttt{make paper} "
                r"as its results are committed.")
    s = Study(root, tolerance)
    done = num.add(short, s.name, "*", "*", "*", "runs", str(len(s.runs)))
    total = num.add(short, s.name, "*", "*", "*", "runstotal", str(s.total))
    if len(s.runs) < s.total or not s.runs:
        return _v2_in_progress(num, s, done, total)
    _cell_numbers(num, s)
    _task_numbers(num, s)
    _study_numbers(num, s)
    summary = summary_table(num, [s]).replace(r"\label{tab:summary}", r"\label{tab:summary-v2}")
    parts = [rf"Study v2 is complete: {done} runs. " + _provenance(s) + r" Table~\ref{tab:summary-v2} summarises "
             r"it; the per-task tables follow.", summary]
    parts += [cell_table(num, s, t) for t in s.tasks]
    if figures:
        from .figures import draw_pareto

        draw_pareto(s, out / "figures")
    # the text names the figure either way: figures=False regenerates the text beside committed figures
    parts.append(r"\begin{figure}[tbp]\centering\includegraphics[width=\linewidth]{generated/figures/pareto-"
                 + s.name + r".pdf}\caption{Study v2: metric against trainable LoRA parameters per method "
                 r"(mean $\pm$ std over seeds).}\label{fig:pareto-v2}\end{figure}")
    return "\n\n".join(parts)


def _provenance(s: Study) -> str:
    """Where v2's runs ran and with which library versions (the sweep spans sessions, and a library can move between
    them: each run records its own)."""
    return ("Machines: \\" + macro_name(s.short, "machines") + "{}. Library versions, as each run recorded "
            "them: \\" + macro_name(s.short, "versions") + "{}.")


def _v2_in_progress(num: Numbers, s: Study, done: str, total: str) -> str:
    """The sentence of a running v2 and the tables of its finished tasks (a task's numbers do not change once
    every run of its grid is in; the summary, the study's totals and the figure wait for the whole grid)."""
    finished_tasks, complete, running = [], [], []
    for task in list(s.experiment.get("tasks") or {}) or s.tasks:
        finished, grid = s.task_runs(task)
        runs = num.add(s.short, s.name, task, "*", "*", "runs", str(finished))
        if 0 < grid == finished:
            finished_tasks.append(task)
            complete.append(rf"\texttt{{{_tex(task)}}} ({runs} runs, Table~\ref{{tab:{s.name}-{task}}})")
        else:
            runstotal = num.add(s.short, s.name, task, "*", "*", "runstotal", str(grid))
            running.append(rf"\texttt{{{_tex(task)}}} ({runs} of {runstotal} runs)")
    text = r"Study v2 (\texttt{" + _tex("studies/" + s.name) + rf"}}) is in progress: {done} of {total} runs."
    text += (" Complete: " + ", ".join(complete) + ".") if complete else " No task is complete yet."
    text += (" In progress: " + ", ".join(running) + ".") if running else ""
    text += (r" A task's table appears here when every run of its grid is committed; the summary and figures when "
             r"every run of the study is (\texttt{make paper}).")
    _provenance_numbers(num, s)
    text += " " + _provenance(s)
    view = s.only(finished_tasks)
    _cell_numbers(num, view)
    _task_numbers(num, view)
    return "\n\n".join([text] + [cell_table(num, view, t) for t in view.tasks])


def make_paper(studies=STUDIES, out="paper/generated", *, v2=V2_STUDY, tolerance: float = 0.02,
               figures: bool = True) -> list[str]:
    """Write numbers.tex, the tables (tab-*.tex), v2.tex and figures/ into `out`. Returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = [Study(Path(p), tolerance) for p in studies]
    for s in loaded:
        if not s.runs:
            raise RankwiseError(f"{s.root} has no finished run; the paper needs committed results")
    num, files = Numbers(), {}
    # the protocol's constants, so the prose quotes them from one place
    num.add("", "*", "*", "*", "*", "tolerancepct", f"{100 * tolerance:g}")
    num.add("", "*", "*", "*", "*", "holmlevel", f"{HOLM_LEVEL:g}")
    num.add("", "*", "*", "*", "*", "powerpct", "80")
    for s in loaded:
        _cell_numbers(num, s)
        _task_numbers(num, s)
        _study_numbers(num, s)
        for t in s.tasks:
            files[f"tab-{s.name}-{t}.tex"] = cell_table(num, s, t)
    files["tab-summary.tex"] = summary_table(num, loaded)
    files["tab-dynamic.tex"] = dynamic_tables([row for s in loaded for row in _dynamic_numbers(num, s)])
    files["v2.tex"] = _v2_section(num, Path(v2), tolerance, out, figures) + "\n"
    files["numbers.tex"] = num.tex()
    written = []
    for name, text in files.items():
        (out / name).write_text(text)
        written.append(str(out / name))
    if figures:
        from .figures import draw_paper_figures

        written += draw_paper_figures(loaded, out / "figures")
    return written
