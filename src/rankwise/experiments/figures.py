"""The report's figures, from its cells: data shaped here, drawn by plots.py (the only matplotlib importer)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from . import plots

__all__ = ["draw_figures"]


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
