"""What an AdaLoRA run leaves in its folder: the final rank per layer (ranks.json, ranks.md), the rank of every layer
at every allocation (rank_history.json, rank_history.png), and the summary merged into results.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..types import RankwiseError

__all__ = ["write_reports", "read_ranks", "RANKS_FILE", "HISTORY_FILE", "PLOT_FILE"]

RANKS_FILE, TABLE_FILE, HISTORY_FILE, PLOT_FILE = "ranks.json", "ranks.md", "rank_history.json", "rank_history.png"


def _rows(stepper) -> list[dict]:
    rows = []
    for s, r in zip(stepper.slots, stepper.layer_ranks()):
        out_f, in_f = int(s.B.shape[0]), int(s.A.shape[1])
        rows.append({"name": s.name, "shape": [out_f, in_f], "init_rank": s.rank, "final_rank": r,
                     "params": r * (in_f + out_f + 1), "lora_params": r * (in_f + out_f)})
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| layer | shape | init rank | final rank | LoRA params |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['init_rank']} | {r['final_rank']} | "
              f"{r['lora_params']:,} |" for r in rows]
    return "\n".join(lines) + "\n"


def write_reports(stepper, budget, options, run_dir: Path) -> dict:
    """Write the rank files into `run_dir`; return results.json's method_info."""
    from dataclasses import asdict

    rows = _rows(stepper)
    final_params = sum(r["params"] for r in rows)
    summary = {
        "unit": stepper.unit, "budget": budget.to_dict(), "target": stepper.target,
        "init_rank": max(s.rank for s in stepper.slots), "schedule": stepper.schedule.to_dict(),
        "options": asdict(options), "steps_run": stepper.steps_run,
        "allocations": len(stepper.history) - 1,
        "peak_params": stepper.peak_params(), "final_params": final_params,
        "final_lora_params": sum(r["lora_params"] for r in rows),
        "layers_pruned_to_zero": sum(r["final_rank"] == 0 for r in rows),
    }
    (run_dir / RANKS_FILE).write_text(json.dumps({**summary, "layers": rows}, indent=2) + "\n")
    (run_dir / TABLE_FILE).write_text(_table(rows))
    history = {"steps": [h[0] for h in stepper.history], "layers": stepper.names,
               "ranks": [h[1] for h in stepper.history], "total_step": stepper.schedule.total_step,
               "tinit": stepper.schedule.tinit, "final_step": stepper.schedule.final_step}
    (run_dir / HISTORY_FILE).write_text(json.dumps(history) + "\n")
    summary["final_ranks"] = {r["name"]: r["final_rank"] for r in rows}
    summary["files"] = [RANKS_FILE, TABLE_FILE, HISTORY_FILE]
    try:
        from ..experiments.plots import plot_rank_history

        plot_rank_history(history, run_dir / PLOT_FILE)
        summary["files"].append(PLOT_FILE)
    except RankwiseError as e:  # matplotlib missing: the numbers are all in rank_history.json
        print(f"rank plot skipped: {e}", file=sys.stderr)
    return summary


def read_ranks(run_dir: str | os.PathLike) -> dict[str, int]:
    """{layer: final rank} of an AdaLoRA run (0 for pruned layers)."""
    p = Path(run_dir) / RANKS_FILE
    if not p.is_file():
        raise RankwiseError(f"{run_dir} has no {RANKS_FILE}; it is not a finished adalora run")
    try:
        return {r["name"]: int(r["final_rank"]) for r in json.loads(p.read_text())["layers"]}
    except (ValueError, KeyError, TypeError) as e:
        raise RankwiseError(f"{p} is corrupt ({e}); re-run `rankwise train --method adalora`") from None
