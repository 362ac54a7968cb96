"""The report's figures, from its cells: data shaped here, drawn by plots.py (the only matplotlib importer)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from . import plots

__all__ = ["draw_figures", "draw_pareto", "draw_rank_panels", "draw_paper_figures"]


def _metric_vs_params(cells, out: Path) -> list[str]:
    paths = []
    for task in dict.fromkeys(c.task for c in cells):
        series: dict = {}
        for c in (c for c in cells if c.task == task and not math.isnan(c.mean)):
            series.setdefault(c.label, []).append((c.lora_params, c.mean, c.std))
        metric = next(c.metric for c in cells if c.task == task)
        paths += plots.plot_metric_vs_params(series, out / f"metric_vs_params-{task}", metric=metric,
                                             title=f"{task}: {metric} vs trainable parameters")
    return paths


def _mean_curve(runs, curve: str = "loss_curve", key: str = "loss") -> tuple[list, list]:
    """`key` at the steps every seed logged in train_info[curve], averaged over seeds."""
    curves = [{p["step"]: p[key] for p in r.train_info.get(curve, []) if key in p} for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [sum(c[s] for c in curves) / len(curves) for s in steps]


def _curves(cells, out: Path, curve: str, prefix: str) -> list[str]:
    """One figure per task x budget, one line per method: the training loss, or (prefix "eval") the task's
    metric on the validation set at each --eval-steps evaluation, where the runs recorded one."""
    paths = []
    for key in dict.fromkeys((c.task, c.budget) for c in cells):
        group = [c for c in cells if (c.task, c.budget) == key]
        field = "loss" if curve == "loss_curve" else group[0].metric
        curves = {}
        for c in group:
            steps, values = _mean_curve(c.runs, curve, field)
            if len(steps) > (0 if curve == "loss_curve" else 1):  # one evaluation is the final one, not a curve
                curves[c.label] = (steps, values)
        if curves:
            what = "training loss" if curve == "loss_curve" else f"validation {field}"
            paths += plots.plot_loss_curves(curves, out / f"{prefix}-{key[0]}-{key[1]}",
                                            title=f"{key[0]}, budget {key[1]}: {what}",
                                            ylabel=f"{what} (mean over seeds)")
    return paths


def _plans(cells, out: Path) -> list[str]:
    """One heat map per distinct plan (static plans repeat across seeds and tasks; drawn once)."""
    from ..plan import Plan

    seen, paths = set(), []
    for c in cells:
        for r in c.runs:
            p = Path(r.dir) / "plan.json"
            if not p.is_file():
                continue
            plan = Plan.load(p)
            digest = hashlib.sha256(json.dumps(sorted(plan.ranks.items())).encode()).hexdigest()[:8]
            if digest in seen:
                continue
            seen.add(digest)
            stem = out / f"plan-{c.label}-{c.budget}-{c.task}-s{r.seed}"
            title = f"{c.label}, budget {c.budget} ({plan.spent:,} params), {c.task} seed {r.seed}"
            paths += [plots.plot_plan(plan, f"{stem}.{ext}", title=title) for ext in ("png", "pdf")]
    return paths


def draw_figures(cells, out: str | Path) -> list[str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return (_metric_vs_params(cells, out) + _curves(cells, out, "loss_curve", "loss")
            + _curves(cells, out, "eval_curve", "eval") + _plans(cells, out))


# ----- the paper's figures (rankwise paper): a study's cells, drawn as multi-panel figures --------------------------

def _window(cells, ref_label: str = "uniform", reach: float = 0.1):
    """The y range of a task's panel: every mean within `reach` of uniform's at the same budget (others are drawn
    at the edge), so a collapsed method does not hide differences of a point between the rest."""
    refs = {c.budget: c.mean for c in cells if c.label == ref_label}
    near = [(c.mean - c.std if c.std == c.std else c.mean, c.mean + c.std if c.std == c.std else c.mean)
            for c in cells if c.budget in refs and abs(c.mean - refs[c.budget]) <= reach]
    if not near or len(near) == len(cells):
        return None
    return min(a for a, _ in near), max(b for _, b in near)


def draw_pareto(study, out: str | Path) -> list[str]:
    """pareto-<study>.pdf/png: metric against trainable parameters, one panel per task."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    panels = []
    for task in study.tasks:
        cells = [c for c in study.cells if c.task == task and not math.isnan(c.mean)]
        series: dict = {}
        for c in cells:
            series.setdefault(c.label, []).append((c.lora_params, c.mean, c.std))
        panels.append({"title": task, "metric": cells[0].metric, "series": series, "ylim": _window(cells)})
    return plots.plot_metric_grid(panels, out / f"pareto-{study.name}", ncols=2 if len(panels) > 1 else 1)


def _ranks_of(run) -> dict | None:
    """A run's rank per layer: its plan.json, or for AdaLoRA the ranks it ended with."""
    from ..plan import Plan

    p = Path(run.dir) / "plan.json"
    if p.is_file():
        return {r.name: r.rank for r in Plan.load(p).layers}
    final = (run.results.get("method_info") or {}).get("final_ranks")
    return dict(final) if final else None


def draw_rank_panels(study, task: str, budget: str, seed: int, out: str | Path) -> list[str]:
    """ranks-<study>-<task>-<budget>-s<seed>: every method's rank per layer at one task, budget and seed."""
    panels = []
    for c in (c for c in study.cells if (c.task, c.budget) == (task, budget)):
        run = next((r for r in c.runs if r.seed == seed), None)
        ranks = _ranks_of(run) if run is not None else None
        if ranks and c.label != "peft_eva":  # peft's EVA spends another budget (rank sum); not compared
            name = f"{c.label} (final)" if c.label == "adalora" else c.label
            panels.append((name, ranks))
    if len(panels) < 2:
        return []
    return plots.plot_rank_panels(panels, Path(out) / f"ranks-{study.name}-{task}-{budget}-s{seed}")


def draw_paper_figures(studies, out: str | Path) -> list[str]:
    """Per study: the Pareto view, and rank per layer of every method for its first task, each budget, seed 0."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in studies:
        paths += draw_pareto(s, out)
        task = s.tasks[0]
        for budget in dict.fromkeys(c.budget for c in s.cells if c.task == task):
            paths += draw_rank_panels(s, task, budget, 0, out)
    return paths
