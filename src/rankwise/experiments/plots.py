"""Every figure rankwise draws. The only module that imports matplotlib, and only inside functions, so the
library imports (and CLI starts) without it."""

from __future__ import annotations

import os
import re

from ..types import RankwiseError

__all__ = ["plot_plan", "plot_metric_vs_params", "plot_loss_curves", "plot_multirank", "plot_rank_history",
           "plot_metric_grid", "plot_rank_panels"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise RankwiseError("plotting needs matplotlib: pip install 'rankwise[plot]'") from None
    return plt


def _role(name: str) -> str:
    """The module's role with its block index removed: `encoder.layer.3.attention.self.query` -> `attention.self.query`."""
    m = re.search(r"(?:^|\.)\d+\.(.+)$", name)
    return m.group(1) if m else name


def plot_plan(plan, path: str | os.PathLike, title: str | None = None) -> str:
    """Heat map of rank per layer: block depth on x, module role on y, the rank written in each cell."""
    import numpy as np

    plt = _pyplot()
    roles = list(dict.fromkeys(_role(r.name) for r in plan.layers))
    depths = sorted({r.depth for r in plan.layers if r.depth is not None})
    cols = depths + ([None] if any(r.depth is None for r in plan.layers) else [])
    grid = np.full((len(roles), len(cols)), np.nan)
    for r in plan.layers:
        grid[roles.index(_role(r.name)), cols.index(r.depth)] = r.rank
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cols) + 3), max(2.5, 0.4 * len(roles) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7,
                    color="white" if v < np.nanmax(grid) * 0.6 else "black")
    ax.set_xticks(range(len(cols)), ["-" if c is None else str(c) for c in cols])
    ax.set_yticks(range(len(roles)), roles, fontsize=8)
    ax.set_xlabel("block (depth)")
    fig.colorbar(im, ax=ax, label="LoRA rank")
    ax.set_title(title or f"{plan.strategy}: {plan.spent:,} / {plan.budget.params:,} trainable parameters")
    fig.tight_layout()
    _write(fig, path, dpi=120)
    plt.close(fig)
    return str(path)


def _write(fig, path, **kw) -> None:
    # No creation date in a PDF: regenerating a report from the same results rewrites identical PDF and PNG
    # files, so a committed report changes only where its numbers do.
    meta = {"CreationDate": None} if str(path).lower().endswith(".pdf") else None
    fig.savefig(path, metadata=meta, **kw)


def _save(fig, stem) -> list[str]:
    """Write the figure as PNG (for Markdown) and PDF (for LaTeX)."""
    plt = _pyplot()
    paths = []
    for ext in ("png", "pdf"):
        path = f"{stem}.{ext}"
        _write(fig, path, dpi=150 if ext == "png" else None, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


_MARKERS = "osD^vP*Xh<>"


def _style(i: int) -> dict:
    """Marker and line style of the i-th method: the colour cycle repeats after 10, so an 11th method (study v2
    has 11) differs by its marker and a dashed line."""
    return {"color": f"C{i % 10}", "marker": _MARKERS[i % len(_MARKERS)], "linestyle": "-" if i < 10 else "--"}


def plot_metric_vs_params(series: dict, stem: str | os.PathLike, *, metric: str, title: str) -> list[str]:
    """One line per method: x = LoRA parameters trained, y = metric mean with error bars.

    `series`: {method: [(params, mean, error), ...]}: the error is the std (the report's per-run view) or the 95%
    interval half-width (the budget curves); nan for one seed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, points) in enumerate(series.items()):
        points = sorted(points)
        xs, ys, es = zip(*points)
        ax.errorbar(xs, ys, yerr=[0 if e != e else e for e in es], capsize=3, label=label,
                    linewidth=2.5 if label == "uniform" else 1.2, **_style(i))
    ax.set_xscale("log")
    ax.set_xlabel("trainable LoRA parameters")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, stem)


def plot_tuning_curves(curves: dict, stem: str | os.PathLike, *, title: str, ylabel: str) -> list[str]:
    """Held-out score against learning rate (log axis), one line per tuned method (`curves`: {method: (lrs,
    scores)})."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, (lrs, scores)) in enumerate(curves.items()):
        pts = sorted(zip(lrs, scores))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, linewidth=2.5 if label == "uniform" else 1.2,
                **_style(i))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, stem)


def plot_loss_curves(curves: dict, stem: str | os.PathLike, *, title: str,
                     ylabel: str = "training loss (mean over seeds)") -> list[str]:
    """A curve over optimizer steps, one line per method (`curves`: {method: (steps, values)}): the training
    loss, or with `ylabel` any other per-step series (the validation metric of --eval-steps)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, label=label, linewidth=2.5 if label == "uniform" else 1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, stem)


def plot_multirank(rows: list[dict], path: str | os.PathLike, title: str | None = None) -> str:
    """Multi-rank discovery: per layer, each branch's share of the update (stacked bars, one colour per branch
    position) and the effective rank of the layer's delta next to its rank sum."""
    plt = _pyplot()
    if not rows:
        raise RankwiseError("no multi-rank layers to plot")
    names = [r["name"] for r in rows]
    y = list(range(len(rows)))
    n_branch = max(len(r["ranks"]) for r in rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, sharey=True, figsize=(11, max(3.0, 0.22 * len(rows) + 1.5)))
    left = [0.0] * len(rows)
    for i in range(n_branch):
        shares = [r["shares"][i] if i < len(r["shares"]) else 0.0 for r in rows]
        label = "/".join(sorted({str(r["ranks"][i]) for r in rows if i < len(r["ranks"])}, key=int, reverse=True))
        ax1.barh(y, shares, left=left, label=f"branch {i + 1} (r={label})")
        left = [a + b for a, b in zip(left, shares)]
    ax1.set_xlabel("share of |s_i c_i| ||B_i A_i||_F")
    ax1.set_yticks(y, names, fontsize=6)
    ax1.invert_yaxis()
    ax1.legend(fontsize=6, loc="lower right")
    ax2.plot([r["effective_rank"] for r in rows], y, "o", label=f"effective rank ({rows[0]['energy']:g} energy)")
    ax2.plot([sum(r["ranks"]) for r in rows], y, "|", markersize=10, label="rank sum")
    ax2.set_xlabel("rank")
    ax2.legend(fontsize=6)
    fig.suptitle(title or "multi-rank LoRA: branch contributions and discovered ranks")
    fig.tight_layout()
    _write(fig, path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_rank_history(history: dict, path: str | os.PathLike, title: str | None = None) -> str:
    """AdaLoRA: rank of every layer (rows) over training steps (columns); `history` is rank_history.json
    ({"steps", "layers", "ranks": one list per step, "total_step"}). Each allocation's ranks hold until the next."""
    import numpy as np

    plt = _pyplot()
    steps, layers = list(history["steps"]), list(history["layers"])
    grid = np.asarray(history["ranks"], dtype=float).T  # (layers, allocations)
    edges = np.asarray(steps + [max(history.get("total_step") or 0, steps[-1] + 1)], dtype=float)
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.18 * len(layers) + 1.5)))
    mesh = ax.pcolormesh(edges, np.arange(len(layers) + 1), grid, cmap="viridis", shading="flat")
    ax.set_yticks(np.arange(len(layers)) + 0.5, layers, fontsize=6 if len(layers) > 24 else 8)
    ax.invert_yaxis()
    for key, label in (("tinit", "warm-up ends"), ("final_step", "ranks frozen")):
        if history.get(key):
            ax.axvline(history[key], color="white", linestyle="--", linewidth=1)
            ax.text(history[key], -0.3, label, fontsize=7, ha="center", va="bottom")
    ax.set_xlabel("optimizer step")
    fig.colorbar(mesh, ax=ax, label="rank (kept triplets)")
    final = grid[:, -1]
    ax.set_title(title or f"AdaLoRA ranks: {int(grid[:, 0].sum())} -> {int(final.sum())} triplets, final "
                          f"{int(final.min())}..{int(final.max())} per layer")
    fig.tight_layout()
    _write(fig, path, dpi=120)
    plt.close(fig)
    return str(path)


def _grid(plt, n: int, ncols: int, size: tuple[float, float]):
    rows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(rows, min(ncols, n), figsize=(size[0] * min(ncols, n), size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def plot_metric_grid(panels: list[dict], stem: str | os.PathLike, *, ncols: int = 2) -> list[str]:
    """The Pareto view of a study, one panel per task: x = LoRA parameters trained (log), y = metric mean with std
    bars, one line per method (methods side by side at each budget so the bars stay apart).

    Each panel: {"title", "metric", "series": {method: [(params, mean, std), ...]}, "ylim": (lo, hi) or None}.
    A mean outside ylim is drawn as a triangle at the edge with its value written, so one collapsed method does not
    flatten every other line."""
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels), ncols, (5.2, 3.6))
    for ax, panel in zip(axes, panels):
        labels = list(panel["series"])
        lo, hi = panel.get("ylim") or (None, None)
        for i, label in enumerate(labels):
            pts = sorted(panel["series"][label])
            shift = 1 + 0.025 * (i - (len(labels) - 1) / 2)
            xs = [x * shift for x, _, _ in pts]
            ys = [y if lo is None else min(max(y, lo), hi) for _, y, _ in pts]
            es = [0 if e != e or (lo is not None and not lo <= y <= hi) else e for _, y, e in pts]
            line = ax.errorbar(xs, ys, yerr=es, markersize=3, capsize=2, label=label,
                               linewidth=2.2 if label == "uniform" else 0.9, **_style(i))
            for x, (_, y, _) in zip(xs, pts):
                if lo is not None and not lo <= y <= hi:
                    edge = lo if y < lo else hi
                    ax.plot([x], [edge], marker="v" if y < lo else "^", color=line[0].get_color(), markersize=7)
                    # inside the axes (above a low edge, below a high one), staggered for methods at one budget
                    dy = -9 - 7 * i % 21 if y > hi else 4 + 7 * i % 21
                    ax.annotate(f"{label} {y:.2f}", (x, edge), fontsize=6, xytext=(3, dy), textcoords="offset points")
        if lo is not None:
            pad = 0.04 * (hi - lo)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xscale("log")
        ax.set_xlabel("trainable LoRA parameters")
        ax.set_ylabel(panel["metric"])
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, stem)


def _depth_of(name: str):
    m = re.search(r"(?:^|\.)(\d+)\.", name)
    return int(m.group(1)) if m else None


def plot_rank_panels(panels: list[tuple[str, dict]], stem: str | os.PathLike, *, ncols: int = 3) -> list[str]:
    """Rank per layer for several allocations side by side: one heat map per panel (block depth on x, module role
    on y), all on one colour scale. `panels`: [(title, {module name: rank}), ...]."""
    import numpy as np

    plt = _pyplot()
    vmax = max(max(r.values()) for _, r in panels)
    fig, axes = _grid(plt, len(panels), ncols, (3.4, 2.4))
    for k, (ax, (title, ranks)) in enumerate(zip(axes, panels)):
        roles = list(dict.fromkeys(_role(n) for n in ranks))
        depths = sorted({_depth_of(n) for n in ranks if _depth_of(n) is not None})
        grid = np.full((len(roles), max(len(depths), 1)), np.nan)
        for n, r in ranks.items():
            d = _depth_of(n)
            grid[roles.index(_role(n)), depths.index(d) if d is not None else 0] = r
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        if grid.size <= 64:  # small grids carry their numbers; a 30-block decoder would be unreadable
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=6,
                            color="white" if v < vmax * 0.6 else "black")
        step = max(1, len(depths) // 8)
        ax.set_xticks(range(0, len(depths), step), [str(d) for d in depths[::step]], fontsize=6)
        ax.set_yticks(range(len(roles)), roles if k % ncols == 0 else [], fontsize=6)  # rows repeat: label once
        ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=axes[: len(panels)], label="LoRA rank", shrink=0.8)
    return _save(fig, stem)
