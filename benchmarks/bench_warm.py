"""Warm workers: a sweep run's fixed cost (wall time minus training time), warm and cold, against one cold import.

In one process, interleaved, `--rounds` times:
  import  `python -c "import torch, transformers, peft; from transformers import Trainer"` in a fresh process
          (the start-up every cold run pays before it reads a byte of data); `--imports` per round
  warm    `rankwise sweep EXP --jobs 1`: six one-step runs (`max_steps: 1`, uniform rank 2 on MiniLM's linear
          layers, seeds 0-5) on a 12-row CSV, each forked from the sweep's fork server (rankwise.warm)
  cold    the same sweep with `--cold` (RANKWISE_COLD_RUNS=1): each run its own `python -m rankwise train`
Per run: fixed cost = the sweep's `seconds` for it (OUT/attempts.jsonl, launch to exit, as the sweep times it)
minus its training time (results.json train_info.wall_time_s). The first warm run of a sweep also waits for
the fork server's one-time preload; `mean` includes that share, `median` is the steady per-run cost.
The check (issue 23): warm fixed cost per run < 0.5 x the median cold import.

    python benchmarks/bench_warm.py   # -> results/bench_warm.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main", "IMPORT"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

IMPORT = "import torch, transformers, peft; from transformers import Trainer"
RUNS = 6
_ROWS = [("a wonderful and moving film", 1), ("dull and far too long", 0), ("the cast is superb", 1),
         ("a mess from start to finish", 0), ("funny and warm and smart", 1), ("i wanted my money back", 0)]


def _write_assets(root: Path) -> Path:
    """A 12-row CSV task (8 train, 4 validation) and the experiment: six one-step runs on MiniLM."""
    data = root / "data"
    data.mkdir(parents=True)
    rows = [f"{t} {i},{y}" for i, (t, y) in enumerate(_ROWS * 2)]
    (data / "train.csv").write_text("text,label\n" + "\n".join(rows[:8]) + "\n")
    (data / "validation.csv").write_text("text,label\n" + "\n".join(rows[8:]) + "\n")
    exp = root / "exp.yaml"
    exp.write_text("name: warm-bench\n"
                   "base: {model: minilm, targets: all-linear, max_steps: 1, batch_size: 4, device: cpu, "
                   "max_length: 32}\n"
                   f"tasks:\n  toy: {{data: {data}}}\n"
                   f"grid:\n  methods: [uniform]\n  budgets: [2]\n  seeds: {list(range(RUNS))}\n")
    return exp


def _time(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def _sweep(exp: Path, out: Path, cold: bool, env: dict) -> dict:
    """One sweep of the six runs: its wall time and, per run, seconds, training seconds and fixed cost."""
    cmd = [sys.executable, "-m", "rankwise", "sweep", str(exp), "--out", str(out), "--jobs", "1", "-q"]
    wall = _time(cmd + (["--cold"] if cold else []), env)
    done = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    done = [a for a in done if a["event"] == "done"]
    if len(done) != RUNS:
        raise SystemExit(f"{out}: {len(done)} of {RUNS} runs finished")
    runs = []
    for a in done:
        results = next(out.glob(f"**/{a['run']}/results.json"))
        train = json.loads(results.read_text())["train_info"]["wall_time_s"]
        runs.append({"run": a["run"], "seconds": a["seconds"], "train_s": train, "fixed_s": a["seconds"] - train})
    return {"sweep_wall_s": wall, "runs": runs}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _summary(sweeps: list[dict]) -> dict:
    fixed = [r["fixed_s"] for s in sweeps for r in s["runs"]]
    train = [r["train_s"] for s in sweeps for r in s["runs"]]
    return {"fixed_per_run_median_s": statistics.median(fixed), "fixed_per_run_mean_s": statistics.mean(fixed),
            "train_per_run_median_s": statistics.median(train),
            "sweep_wall_median_s": statistics.median(s["sweep_wall_s"] for s in sweeps)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (import, sweeps warm and cold)")
    ap.add_argument("--imports", type=int, default=2, help="cold imports timed per round")
    ap.add_argument("--out", default=str(RESULTS / "bench_warm.json"))
    args = ap.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if k != "RANKWISE_COLD_RUNS"} | {"HF_HUB_OFFLINE": "1"}
    imports, sweeps, load = [], {"warm": [], "cold": []}, [_uptime()]
    _time([sys.executable, "-c", IMPORT], env)  # discarded: fills the page cache for both sides
    with tempfile.TemporaryDirectory(prefix="bench_warm_") as tmp:
        exp = _write_assets(Path(tmp))
        for r in range(args.rounds):
            order = ("warm", "cold") if r % 2 == 0 else ("cold", "warm")
            for mode in order:
                imports.append(_time([sys.executable, "-c", IMPORT], env))
                sweeps[mode].append(_sweep(exp, Path(tmp) / f"{mode}-{r}", mode == "cold", env))
                for _ in range(args.imports - 1):
                    imports.append(_time([sys.executable, "-c", IMPORT], env))
                load.append(_uptime())
                s = _summary(sweeps[mode][-1:])
                print(f"round {r + 1} {mode}: fixed/run median {s['fixed_per_run_median_s']:.2f}s mean "
                      f"{s['fixed_per_run_mean_s']:.2f}s, sweep {s['sweep_wall_median_s']:.1f}s; "
                      f"import {imports[-1]:.2f}s", flush=True)
    cold_import = statistics.median(imports)
    summary = {mode: _summary(s) for mode, s in sweeps.items()}
    ratio = {mode: {k: summary[mode][f"fixed_per_run_{k}_s"] / cold_import for k in ("median", "mean")}
             for mode in summary}
    result = {
        "benchmark": "bench_warm",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "uptime_during": load},
        "versions": {p: md.version(p) for p in ("rankwise", "torch", "transformers", "peft", "datasets")}
        | {"python": platform.python_version()},
        "git_head": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                   text=True).stdout.strip(),
        "config": {"model": "minilm (all-MiniLM-L6-v2)", "runs_per_sweep": RUNS, "jobs": 1, "max_steps": 1,
                   "data": "12-row CSV (8 train, 4 validation)", "strategy": "uniform, rank 2, all-linear",
                   "rounds": args.rounds, "imports_per_round": args.imports, "import_command": IMPORT,
                   "fixed_cost": "attempts.jsonl seconds - results.json train_info.wall_time_s"},
        "cold_import_s": imports,
        "cold_import_median_s": cold_import,
        "sweeps": sweeps,
        "summary": summary,
        "fixed_cost_to_cold_import": ratio,
        "warm_below_half_import": ratio["warm"]["median"] < 0.5 and ratio["warm"]["mean"] < 0.5,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(out)
    print(json.dumps({k: result[k] for k in ("cold_import_median_s", "summary", "fixed_cost_to_cold_import",
                                             "warm_below_half_import")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
