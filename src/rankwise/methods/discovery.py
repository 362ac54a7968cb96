"""`rankwise plan --from-run RUN_DIR --budget B`: the ranks a trained run discovered, as a static plan.

Any method may discover ranks (`Method.discovered_ranks`: multirank's effective ranks, AdaLoRA's final ranks).
They become a `discovered_rank` metric on the base model's layers, and the `discovered` allocator spends the new
budget in proportion to them through the same exact-budget machinery as every other strategy, so plain LoRA can
be retrained with those ranks at any budget.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..types import LayerInfo, LayerStats, RankwiseError
from .base import method_of_run

__all__ = ["METRIC", "check_from_run", "discovered_stats"]

METRIC = "discovered_rank"


def check_from_run(run_dir: str | os.PathLike, strategy: str | None, model: str | None,
                   targets=None) -> tuple[str, str]:
    """(strategy, model) for a --from-run plan: the `discovered` strategy, on the run's base model by default."""
    if targets:
        raise RankwiseError("--from-run plans the layers the run adapted; drop --targets")
    if strategy not in (None, "discovered"):
        raise RankwiseError(f"--from-run plans with the discovered ranks (strategy 'discovered'), not {strategy!r}; "
                            "drop --strategy")
    method_of_run(run_dir)  # not a run folder, or an unknown method: one line now
    if model is None:
        task = json.loads((Path(run_dir) / "task.json").read_text())
        path = task.get("base_model_path")
        model = path if path and Path(path).exists() else task.get("base_model")
        if not model:
            raise RankwiseError(f"{run_dir}/task.json names no base model; give MODEL before --from-run")
    return "discovered", str(model)


def _match(found: str, layers: dict[str, LayerInfo]) -> LayerInfo | None:
    """The model layer a run's module name refers to (the run may name it under a task head, e.g. `bert.`)."""
    name = found.removeprefix("base_model.model.")
    hits = [lay for n, lay in layers.items() if n == name or name.endswith("." + n) or n.endswith("." + name)]
    if len(hits) > 1:
        exact = [lay for lay in hits if lay.name == name]
        hits = exact or hits
    if len(hits) > 1:
        raise RankwiseError(f"run layer {found} matches several model layers ({hits[0].name}, {hits[1].name})")
    return hits[0] if hits else None


def discovered_stats(run_dir: str | os.PathLike, model) -> list[LayerStats]:
    """LayerStats of the base model's layers the run adapted, each with the run's discovered rank as a metric."""
    from ..stats.sources import open_source

    ranks = method_of_run(run_dir).discovered_ranks(run_dir)
    if not ranks:
        raise RankwiseError(f"{run_dir} discovered no ranks (no adapted layer)")
    layers = {lay.name: lay for lay in open_source(model).layers}
    stats, missing = [], []
    for name, r in ranks.items():
        lay = _match(name, layers)
        if lay is None:
            missing.append(name)
        else:
            stats.append(LayerStats(lay, {METRIC: float(r)}))
    if missing:
        raise RankwiseError(f"layers of {run_dir} not found in model {model}: {missing[:3]}; give the run's base "
                            "model (or one of the same architecture)")
    if not any(s.metrics[METRIC] > 0 for s in stats):
        raise RankwiseError(f"{run_dir} discovered rank 0 in every layer: its adapter learned nothing to plan with")
    return stats
