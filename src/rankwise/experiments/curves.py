"""The report's budget-curve sections (study v2): the metric against trainable parameters with 95% intervals,
the efficiency table, and the tuning table with its curves and the check of the sharing assumption.

Drawn only where the data are there: a Pareto figure and an efficiency table when a task has three or more
budgets, the tuning sections when sweep.json holds a tune: section's table.
"""

from __future__ import annotations

import math
from pathlib import Path

from .results import LOWER_IS_BETTER, REFERENCES
from .tuning import TuneSpec

__all__ = ["v2_sections", "efficiency_rows", "glance_rows", "half_width", "sharing_rows"]

UNIFORM = "uniform"


def half_width(std: float, n: int, level: float = 0.95) -> float:
    """Half the t interval of a mean over n seeds (nan for one seed)."""
    if n < 2 or math.isnan(std):
        return math.nan
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)


def _by_task(cells) -> dict:
    out: dict = {}
    for c in cells:
        if not math.isnan(c.mean):
            out.setdefault(c.task, []).append(c)
    return out


def efficiency_rows(cells) -> list[dict]:
    """Per task and method: the smallest budget at which its mean reaches uniform's best mean within uniform's
    95% interval (higher-is-better: mean >= best - half width), and the parameters that saves against the
    budget where uniform has its best mean."""
    rows = []
    for task, tc in _by_task(cells).items():
        uni = [c for c in tc if c.label == UNIFORM]
        if not uni:
            continue
        sign = -1 if tc[0].metric in LOWER_IS_BETTER else 1
        best = max(uni, key=lambda c: sign * c.mean)
        half = half_width(best.std, best.n)
        bar = best.mean - sign * (0 if math.isnan(half) else half)
        for label in dict.fromkeys(c.label for c in tc):
            mine = sorted((c for c in tc if c.label == label), key=lambda c: c.lora_params)
            hit = next((c for c in mine if sign * (c.mean - bar) >= 0), None)
            rows.append({"task": task, "method": label, "metric": best.metric, "target": bar,
                         "uniform_best": best.mean, "uniform_best_params": best.lora_params,
                         "reaches_at": hit.lora_params if hit else None, "mean_there": hit.mean if hit else None,
                         "saves": best.lora_params - hit.lora_params if hit else None,
                         "saves_ratio": (best.lora_params / hit.lora_params) if hit else None})
    return rows


def _efficiency_md(rows: list[dict]) -> list[str]:
    out = ["## Efficiency: the smallest budget that reaches uniform's best", "",
           "Per task, uniform's best mean over the budget curve, less its 95% interval half-width, is the bar; "
           "each method's smallest budget whose mean clears it, and the parameters that saves against uniform's "
           "best budget (negative: it needs more). `never`: no budget of the curve clears it.", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        tr = [r for r in rows if r["task"] == task]
        out += [f"### {task}: bar {tr[0]['target']:.4f} (uniform's best {tr[0]['uniform_best']:.4f} at "
                f"{tr[0]['uniform_best_params']:,} parameters, `{tr[0]['metric']}`)", "",
                "| method | reaches the bar at | mean there | saves | x fewer |", "|---|---:|---:|---:|---:|"]
        for r in tr:
            if r["reaches_at"] is None:
                out.append(f"| {r['method']} | never | – | – | – |")
            else:
                out.append(f"| {r['method']} | {r['reaches_at']:,} | {r['mean_there']:.4f} | {r['saves']:,} | "
                           f"{r['saves_ratio']:.2f} |")
        out.append("")
    return out


def glance_rows(cells) -> dict:
    """Per task with two or more budgets: {budget: reference cell}, and per label {budget: cell}, in the cells'
    order. The reference of a budget is the first of REFERENCES that ran there (what the tables compare with)."""
    out: dict = {}
    for task, tc in _by_task(cells).items():
        budgets = list(dict.fromkeys(c.budget for c in tc))
        if len(budgets) < 2:
            continue
        refs = {b: next((c for name in REFERENCES for c in tc if c.budget == b and c.label == name), None)
                for b in budgets}
        rows: dict = {}
        for c in tc:
            rows.setdefault(c.label, {})[c.budget] = c
        out[task] = {"budgets": budgets, "reference": refs, "rows": rows}
    return out


def _glance_cell(c, ref) -> str:
    if c is None:
        return "-"
    if c is ref:
        return "(reference)"
    if c.cmp is None:
        return "not compared"
    d, lo, hi = c.cmp["diff"], c.cmp["lo"], c.cmp["hi"]
    if math.isnan(lo):  # one seed, or every paired difference equal (no interval)
        if c.cmp["n"] < 2:
            return f"{d:+.4f} (1 seed)"
        return "same as reference" if d == 0 else f"{d:+.4f} on every seed"
    star = " *" if lo > 0 or hi < 0 else ""
    return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]{star}"


def _glance_md(glance: dict) -> list[str]:
    out = ["## At a glance: every entry against the reference, budget by budget", "",
           "The reference's mean ± std over seeds (uniform, or the label named where uniform did not run), then "
           "each entry's difference to it paired by seed with its 95% t interval. `*`: the interval excludes zero "
           "before any adjustment for the number of comparisons (Holm's adjusted p is in the tables above). "
           "`same as reference`: every seed's run scored exactly the reference's (the same plan).", ""]
    for task, g in glance.items():
        budgets, refs = g["budgets"], g["reference"]
        out += [f"### {task}", "", "| entry | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
        cols = []
        for b in budgets:
            r = refs[b]
            cols.append("-" if r is None else (f"{r.mean:.4f} ± {r.std:.4f}" if r.n > 1 else f"{r.mean:.4f}")
                        + ("" if r is None or r.label == REFERENCES[0] else f" ({r.label})"))
        out.append("| reference | " + " | ".join(cols) + " |")
        for label, row in g["rows"].items():
            if all(row.get(b) is refs[b] or row.get(b) is None for b in budgets):
                continue  # only ever the reference: its row is the first
            out.append(f"| {label} | " + " | ".join(_glance_cell(row.get(b), refs[b]) for b in budgets) + " |")
        tested = [c for row in g["rows"].values() for c in row.values() if c.cmp and not math.isnan(c.cmp["p"])]
        if tested:
            low = min(tested, key=lambda c: c.cmp.get("p_holm", math.nan))
            excl = sum(c.cmp["lo"] > 0 or c.cmp["hi"] < 0 for c in tested)
            out += ["", f"{len(tested)} comparisons with a test, {excl} of them with an interval that excludes "
                    f"zero; the smallest Holm-adjusted p is {low.cmp.get('p_holm', math.nan):.3f} ({low.label} at "
                    f"{low.budget})."]
        out.append("")
    return out


def sharing_rows(tuning: dict) -> list[dict]:
    """For each label tuned on its own only to check sharing (tune.verify): its own best value against the value
    it shares in the grid, per task and budget. Which label it shares with at a budget is `TuneSpec.source`'s
    rule; a tuned label has a chosen value at every budget it runs, so the table gives the budgets it needs."""
    spec = tuning.get("spec") or {}
    chosen = {(r["task"], r["label"], str(r["budget"])): r["values"] for r in tuning.get("table") or []
              if r.get("chosen")}
    rows = []
    for task, labels in (spec.get("verify") or {}).items():
        budgets: dict = {}
        for t, lab, b in chosen:
            if t == task:
                budgets.setdefault(lab, set()).add(b)
        rule = TuneSpec({}, {}, spec.get("share") or {}, budgets=budgets)
        for label in labels:
            for b in (b for t, lab, b in chosen if (t, lab) == (task, label)):
                src = rule.source(label, b)
                if src == label:
                    continue  # the grid uses its own choice at this budget: nothing shared to check
                own, shared = chosen[(task, label, b)], chosen[(task, src, b)]
                rows.append({"task": task, "label": label, "budget": b, "own": own, "shared": shared,
                             "same": own == shared})
    return rows


def _tuning_md(tuning: dict) -> list[str]:
    table = tuning.get("table") or []
    if not table:
        return []
    keys = list(dict.fromkeys(k for r in table for k in r["values"]))
    out = ["## Tuning: every candidate on the held-out training rows", "",
           f"Each candidate trained on the training rows minus {tuning['spec'].get('dev_samples')} held-out rows "
           f"(seeds {tuning['spec'].get('seeds')}) and was scored on those rows; the validation split the tables "
           "report was never used. Chosen: bold. `(extended)`: a value beyond the written list, tried because "
           "the best was at that end (tune.extend).", "",
           "| task | method | budget | " + " | ".join(keys) + " | metric | score |",
           "|---|---|---|" + "---|" * len(keys) + "---|---:|"]
    spec = tuning.get("spec") or {}
    for r in _in_value_order(table):
        score = "failed" if r.get("failed") else "–" if r["score"] is None else f"{r['score']:.4f}"
        if r.get("chosen"):
            score = f"**{score}**"
        written = {**(spec.get("candidates") or {}), **((spec.get("methods") or {}).get(r["label"]) or {})}
        vals = " | ".join(str(r["values"].get(k, "")) + (" (extended)" if k in written and k in r["values"] and
                                                         r["values"][k] not in written[k] else "") for k in keys)
        out.append(f"| {r['task']} | {r['label']} | {r['budget']} | {vals} | {r['metric'] or '–'} | {score} |")
    out.append("")
    share = sharing_rows(tuning)
    if share:
        same = sum(r["same"] for r in share)
        out += ["### The sharing assumption", "",
                "Where a label takes another's tuned value (tune.share), the labels checked were also tuned on their "
                f"own (tune.verify): {same} of {len(share)} own choices equal the shared one.", "",
                "| task | method | budget | own best | shared |", "|---|---|---|---|---|"]
        out += [f"| {r['task']} | {r['label']} | {r['budget']} | {r['own']} | {r['shared']} |" for r in share]
        out.append("")
    return out


def _in_value_order(table: list[dict]) -> list[dict]:
    """The table with each (task, method, budget)'s rows sorted by their values (extensions are appended last
    when they run; 2.5e-4 belongs before 5e-4); groups keep their order."""
    groups: dict = {}
    for r in table:
        groups.setdefault((r["task"], r["label"], str(r["budget"])), []).append(r)

    def key(r):  # numbers by value, anything else (an option's string) after them, by its text
        return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))
                     for _, v in sorted(r["values"].items()))

    return [r for rows in groups.values() for r in sorted(rows, key=key)]


def _figures(cells, tuning: dict | None, out: Path) -> list[str]:
    from . import plots

    paths = []
    for task, tc in _by_task(cells).items():
        if len({c.budget for c in tc}) < 3:
            continue
        series: dict = {}
        for c in tc:
            series.setdefault(c.label, []).append((c.lora_params, c.mean, half_width(c.std, c.n)))
        paths += plots.plot_metric_vs_params(series, out / f"pareto-{task}", metric=tc[0].metric,
                                             title=f"{task}: {tc[0].metric} vs trainable parameters (95% CI)")
    for key in dict.fromkeys((r["task"], str(r["budget"])) for r in (tuning or {}).get("table", [])):
        rows = [r for r in tuning["table"] if (r["task"], str(r["budget"])) == key and r["score"] is not None
                and "lr" in r["values"]]
        curves: dict = {}
        for r in rows:
            curves.setdefault(r["label"], ([], []))
            curves[r["label"]][0].append(float(r["values"]["lr"]))
            curves[r["label"]][1].append(r["score"])
        if curves:
            paths += plots.plot_tuning_curves(curves, out / f"tuning-{key[0]}-b{key[1]}",
                                              title=f"{key[0]}, budget {key[1]}: held-out score vs learning rate",
                                              ylabel=f"{rows[0]['metric']} on held-out training rows")
    return paths


def v2_sections(cells, manifest: dict | None, out: Path, figures: bool) -> tuple[list[str], list[str]]:
    """(Markdown lines, files written) for the budget-curve and tuning sections; empty where they do not apply."""
    tuning = (manifest or {}).get("tuning")
    curve = any(len({c.budget for c in tc}) >= 3 for tc in _by_task(cells).values())
    md, files = [], []
    glance = glance_rows(cells)
    if glance:
        md += _glance_md(glance)
    if curve:
        md += _efficiency_md(efficiency_rows(cells))
    if tuning:
        md += _tuning_md(tuning)
    if figures and (curve or tuning):
        files = _figures(cells, tuning, Path(out) / "figures")
        md += ["## Budget curves and tuning curves", ""]
        md += [f"![{Path(f).stem}](figures/{Path(f).name})" for f in files if f.endswith(".png")] + [""]
    return md, files
