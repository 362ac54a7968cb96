"""`rankwise report`: from a sweep folder's result files alone, the tables and figures a paper needs.

Per task x budget x method: mean +- std of the task's headline metric over seeds, the difference to uniform LoRA
at the same budget with a paired t interval across seeds and the paired t-test p-value, LoRA parameters really
trained, wall time and peak memory. A method is compared to uniform only where every paired run spends a budget
within `tolerance` (default 2%) of the uniform run's; the others are listed as refused, with both numbers.
Every table cell has an id (T<task>.<row>) that the appendix maps to its run folders.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..outputs import check_folder_out
from ..types import RankwiseError
from .results import (LOWER_IS_BETTER, REFERENCES, RunResult, collect, headline_metric, read_manifest,
                      write_json_atomic)

__all__ = ["Cell", "summarize", "paired_t", "holm", "build_cells", "make_report", "reference_of", "REFERENCE",
           "REFERENCES", "LOWER_IS_BETTER"]

REFERENCE = REFERENCES[0]


def summarize(values) -> tuple[float, float, int]:
    """(mean, sample standard deviation (n-1), n); std is nan for one value."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def paired_t(a, b, level: float = 0.95) -> dict:
    """Paired comparison of a against b (same seeds, same order): mean difference a - b, its t confidence interval
    across seeds, and the two-sided p-value of the paired t-test. Needs two pairs; nan where undefined."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    mean, sd, n = summarize(d)
    out = {"diff": mean, "lo": math.nan, "hi": math.nan, "p": math.nan, "n": n}
    if n < 2 or sd == 0 or math.isnan(sd):
        return out
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    t = mean / se
    out.update(lo=mean - half, hi=mean + half, p=float(2 * stats.t.sf(abs(t), n - 1)))
    return out


def holm(pvalues) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (nan stays nan and does not count as a test).

    A task's table makes many comparisons with uniform (methods x budgets); at p < 0.05 one in twenty true nulls
    comes out "significant" by chance. Holm controls the chance of any false positive in the family."""
    idx = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    m = len(idx)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for k, i in enumerate(idx):
        running = max(running, min(1.0, (m - k) * pvalues[i]))  # step-down; adjusted values never decrease
        out[i] = running
    return out


@dataclass
class Cell:
    task: str
    budget: str
    label: str
    metric: str
    runs: list = field(repr=False)  # RunResult, sorted by seed
    mean: float = math.nan
    std: float = math.nan
    n: int = 0
    lora_params: int = 0
    cmp: dict | None = None  # paired comparison with uniform
    refused: str = ""  # why it was not compared
    bold: bool = False
    id: str = ""

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def values(self) -> list[float]:
        return [float(r.eval[self.metric]) for r in self.runs]


def _metric_for(task: str, runs: list[RunResult], chosen: dict) -> str:
    return headline_metric(task, [r.eval for r in runs], chosen)


def _order(labels) -> list[str]:
    return sorted(set(labels), key=lambda x: (x != REFERENCE, x))


def _budget_key(b: str):
    try:
        return (0, float(b[1:]))
    except ValueError:
        return (1, b)


def build_cells(runs: list[RunResult], metrics: dict | None = None, tolerance: float = 0.02) -> list[Cell]:
    """Group runs into cells, compute their statistics and their paired comparison with uniform."""
    metrics = metrics or {}
    cells = []
    tasks = list(dict.fromkeys(r.task for r in runs))
    for ti, task in enumerate(tasks, 1):
        trs = [r for r in runs if r.task == task]
        metric = _metric_for(task, trs, metrics)
        row, task_cells = 0, []
        for budget in sorted({r.budget for r in trs}, key=_budget_key):
            group = []
            for label in _order(r.label for r in trs if r.budget == budget):
                rs = sorted((r for r in trs if r.budget == budget and r.label == label), key=lambda r: r.seed)
                row += 1
                c = Cell(task, budget, label, metric, rs, id=f"T{ti}.{row}")
                c.mean, c.std, c.n = summarize(c.values())
                c.lora_params = round(sum(r.lora_params for r in rs) / len(rs))
                group.append(c)
            _compare(group, tolerance)
            task_cells += group
        family = [c for c in task_cells if c.cmp is not None]  # Holm's family: every comparison of the task
        for c, adj in zip(family, holm([c.cmp["p"] for c in family])):
            c.cmp["p_holm"] = adj
        cells += task_cells
    return cells


def reference_of(group: list) -> "Cell | None":
    """The cell every other cell of a task and budget is compared with: uniform, else uniform_qv."""
    for name in REFERENCES:
        for c in group:
            if c.label == name:
                return c
    return None


def _compare(group: list[Cell], tolerance: float) -> None:
    ref = reference_of(group)
    name = ref.label if ref is not None else REFERENCE
    for c in group:
        if ref is None:
            c.refused = f"no {REFERENCE} runs at this budget"
        if ref is None or c is ref:
            continue
        by_seed = {r.seed: r for r in ref.runs}
        pairs = [(r, by_seed[r.seed]) for r in c.runs if r.seed in by_seed]
        if not pairs:
            c.refused = f"no seed in common with {name}"
            continue
        worst = max(pairs, key=lambda p: abs(p[0].lora_params - p[1].lora_params) / p[1].lora_params)
        rel = (worst[0].lora_params - worst[1].lora_params) / worst[1].lora_params
        if abs(rel) > tolerance:
            c.refused = (f"spends {worst[0].lora_params:,} LoRA parameters vs {worst[1].lora_params:,} for "
                         f"{name} (seed {worst[0].seed}, {rel:+.1%}; tolerance {tolerance:.0%})")
            continue
        c.cmp = paired_t([float(a.eval[c.metric]) for a, _ in pairs], [float(b.eval[c.metric]) for _, b in pairs])
        if name != REFERENCE:
            c.cmp["reference"] = ref.label
    sign = -1 if group and group[0].metric in LOWER_IS_BETTER else 1
    compared = [c for c in group if c.cmp is not None and not math.isnan(c.mean)]
    if compared:
        best = max(compared, key=lambda c: sign * c.mean)
        lo, hi = best.cmp["lo"], best.cmp["hi"]
        better = sign * best.cmp["diff"] > 0
        best.bold = bool(better and not math.isnan(lo) and (lo > 0 or hi < 0))


# ----- formatting ------------------------------------------------------------------------------------------------

def _f(x: float, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(c: Cell) -> str:
    return f"{_f(c.mean)} ± {_f(c.std)}" if c.n > 1 else _f(c.mean)


def _delta(c: Cell) -> tuple[str, str, str]:
    if c.cmp is None and c.label in REFERENCES and not c.refused:
        return "(reference)", "", ""
    if c.cmp is None:
        return "not compared", "", ""
    vs = f" vs {c.cmp['reference']}" if c.cmp.get("reference") else ""
    return (f"{c.cmp['diff']:+.4f} [{_f(c.cmp['lo'])}, {_f(c.cmp['hi'])}]{vs}", _f(c.cmp["p"], 3),
            _f(c.cmp.get("p_holm", math.nan), 3))


def _mean_of(c: Cell, key: str) -> float:
    vals = [float(r.train_info.get(key, math.nan)) for r in c.runs]
    return sum(vals) / len(vals)


_HEAD = ("cell", "budget", "method", "LoRA params", "metric (mean ± std)", "seeds", "Δ vs uniform [95% CI]", "p",
         "p Holm", "wall s", "peak MiB")


def _row(c: Cell) -> list[str]:
    d, p, ph = _delta(c)
    return [c.id, c.budget, c.label, f"{c.lora_params:,}", _pm(c), str(c.n), d, p, ph,
            f"{_mean_of(c, 'wall_time_s'):.0f}", f"{_mean_of(c, 'peak_memory_bytes') / 2**20:.0f}"]


def markdown_tables(cells: list[Cell]) -> str:
    out = []
    for task in dict.fromkeys(c.task for c in cells):
        tc = [c for c in cells if c.task == task]
        direction = "lower is better" if tc[0].metric in LOWER_IS_BETTER else "higher is better"
        out.append(f"### {task}: `{tc[0].metric}` ({direction})\n")
        out.append("| " + " | ".join(_HEAD) + " |")
        out.append("|" + "---|" * len(_HEAD))
        for c in tc:
            cols = _row(c)
            if c.bold:
                cols[4], cols[6] = f"**{cols[4]}**", f"**{cols[6]}**"
            out.append("| " + " | ".join(cols) + " |")
        out.append("")
    return "\n".join(out)


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("–", "--")):
        s = s.replace(a, b)
    return s


def latex_tables(cells: list[Cell]) -> str:
    out = ["% generated by `rankwise report`; needs \\usepackage{booktabs}", ""]
    for task in dict.fromkeys(c.task for c in cells):
        tc = [c for c in cells if c.task == task]
        out += [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{llllrrlrrrr}", r"\toprule",
                " & ".join(_tex(h) for h in _HEAD) + r" \\", r"\midrule"]
        last = None
        for c in tc:
            if last is not None and c.budget != last:
                out.append(r"\midrule")
            last = c.budget
            cols = [_tex(x) for x in _row(c)]
            if c.bold:
                cols[4], cols[6] = rf"\textbf{{{cols[4]}}}", rf"\textbf{{{cols[6]}}}"
            out.append(" & ".join(cols) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}",
                rf"\caption{{{_tex(task)}: {_tex(tc[0].metric)}, mean $\pm$ std over seeds; $\Delta$: paired "
                r"difference to uniform LoRA at the same budget with a 95\% $t$ interval across seeds, $p$ of the "
                r"paired $t$-test, and $p$ Holm-adjusted over the task's comparisons; bold: best cell whose "
                r"interval excludes zero. Cell ids map to run folders in the report's appendix.}",
                rf"\label{{tab:{_tex(task)}}}", r"\end{table}", ""]
    return "\n".join(out)


def _machine(info: dict) -> str:
    hw = info.get("hardware") or {}
    where = hw.get("gpu") or (f"CPU, {hw['cpus']} cores" if hw.get("cpus") else "machine not recorded")
    return f"{info.get('device', '?')} ({where})"


def _environment(runs: list[RunResult], manifest: dict | None) -> list[str]:
    lines = []
    host = (manifest or {}).get("host")
    if host:
        lines.append(f"- sweep host: {host}")
    for task in dict.fromkeys(r.task for r in runs):  # a study may train its tasks on different machines
        machines = sorted({_machine(r.run_info) for r in runs if r.task == task})
        lines.append(f"- {task} trained on: {'; '.join(machines)}")
    versions = sorted({", ".join(f"{k} {v}" for k, v in sorted(r.run_info.get('versions', {}).items()))
                       for r in runs})
    lines += [f"- versions: {v}" for v in versions]
    lines.append(f"- report made on {platform.platform()} ({os.cpu_count()} CPUs), "
                 f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    return lines


def _appendix(cells: list[Cell], root: Path) -> list[str]:
    lines = ["## Appendix: run folders per cell", "",
             "Each run folder holds `results.json` (its exact `rankwise train` command under "
             "`run_info.command`) and `plan.json`.", ""]
    for c in cells:
        dirs = ", ".join(f"`{os.path.relpath(r.dir, root)}` (seed {r.seed})" for r in c.runs)
        lines.append(f"- **{c.id}** {c.task} / {c.budget} / {c.label}: {dirs}")
    return lines


def make_report(sweep_dir: str | os.PathLike, out: str | os.PathLike, *, tolerance: float = 0.02,
                figures: bool = True, command: str | None = None) -> list[str]:
    """Write report.md, tables.tex, cells.json and (with matplotlib) figures/ into `out`. Returns the paths."""
    if not 0 <= tolerance < 1:
        raise RankwiseError(f"--tolerance is a fraction in [0, 1), got {tolerance}")
    check_folder_out(out, "report")  # never ., .., an ancestor, or a folder of the user's (their own report.md)
    root = Path(sweep_dir)
    runs, notes = collect(root)
    if not runs:
        raise RankwiseError(f"{root} has no finished run yet ({len(notes)} unfinished); run `rankwise sweep` first")
    manifest = read_manifest(root)
    metrics = ((manifest or {}).get("experiment") or {}).get("metrics") or {}
    cells = build_cells(runs, metrics, tolerance)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig_lines = []
    if figures:
        from .figures import draw_figures

        figs = draw_figures(cells, out / "figures")
        written += figs
        fig_lines = [f"![{Path(f).stem}](figures/{Path(f).name})" for f in figs if f.endswith(".png")]
    (out / "tables.tex").write_text(latex_tables(cells))
    written.append(str(out / "tables.tex"))
    refused = [c for c in cells if c.refused and c.label != REFERENCE]
    from .curves import v2_sections

    extra_md, extra_files = v2_sections(cells, manifest, out, figures)
    written += extra_files
    exp = (manifest or {}).get("experiment") or {}
    md = [f"# Report: {exp.get('name') or root.name}", "",
          f"{len(runs)} finished runs from `{root}`; {len(cells)} cells (task x budget x method). "
          f"Budgets are compared within {tolerance:.0%}; Δ is paired by seed against `{REFERENCE}` at the "
          "same budget (95% t interval across seeds, two-sided paired t-test p). `p Holm` adjusts p for "
          "the number of comparisons in the task's table (Holm-Bonferroni over every method and budget "
          "compared): with many comparisons, some unadjusted p fall below 0.05 by chance. Bold: the best "
          "cell of a task and budget, only where its interval excludes zero.", "",
          "## Tables", "", markdown_tables(cells)]
    md += extra_md
    if refused:
        md += ["## Not compared (budget differs from uniform by more than the tolerance, or no pair)", ""]
        md += [f"- {c.id} {c.task} / {c.budget} / {c.label}: {c.refused}" for c in refused] + [""]
    pruned = [c for c in cells if any(r.peak_lora_params > r.lora_params for r in c.runs)]
    if pruned:
        md += ["## Dynamic budgets", "", "These methods start with more LoRA parameters and prune to the budget; they "
               "are compared by their final adapter (the LoRA params column).", ""]
        md += [f"- {c.id} {c.task} / {c.budget} / {c.label}: up to "
               f"{max(r.peak_lora_params for r in c.runs):,} during training" for c in pruned] + [""]
    if notes:
        md += ["## Left out", ""] + [f"- {n}" for n in notes] + [""]
    if fig_lines:
        md += ["## Figures", ""] + fig_lines + [""]
    md += ["## Environment", ""] + _environment(runs, manifest) + [""]
    md += ["## Commands", "", "```", (manifest or {}).get("command", "(no sweep.json: runs collected as found)"),
           command or f"rankwise report {root} --out {out}", "```", ""]
    if manifest and manifest.get("experiment_text"):
        md += ["Experiment file:", "", "```yaml", manifest["experiment_text"].rstrip(), "```", ""]
    md += _appendix(cells, root)
    (out / "report.md").write_text("\n".join(md) + "\n")
    written.insert(0, str(out / "report.md"))
    write_json_atomic(out / "cells.json", [_cell_json(c, root) for c in cells])
    written.append(str(out / "cells.json"))
    return written


def _cell_json(c: Cell, root: Path) -> dict:
    return {"id": c.id, "task": c.task, "budget": c.budget, "method": c.label, "metric": c.metric,
            "mean": c.mean, "std": c.std, "n": c.n, "seeds": c.seeds, "values": c.values(),
            "lora_params": c.lora_params, "comparison": c.cmp, "refused": c.refused or None, "bold": c.bold,
            "runs": [os.path.relpath(r.dir, root) for r in c.runs]}
