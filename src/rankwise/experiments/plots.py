"""Every figure rankwise draws. The only module that imports matplotlib, and only inside functions, so the
library imports (and CLI starts) without it."""

from __future__ import annotations

import os
import re

from ..types import RankwiseError

__all__ = ["plot_plan"]


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
