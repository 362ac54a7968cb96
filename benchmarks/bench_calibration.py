"""Calibration cost on MiniLM + SST-2: activations, gradients and both, as a ratio of one training epoch.

In one process, interleaved, `--repeats` times (medians reported):
  act    calibrate(activations only): forward hooks, float64 input Gram per layer, spectra; what
         `plan --data` / `train --strategy activation|eva` run
  grad   calibrate(gradients only): forward + one backward per batch (dL/dW of every target weight); what
         `--strategy gradient` runs
  both   calibrate(both, one pass): what `rankwise analyze --data` runs
  steps  `--steps` optimizer steps of the Trainer that `rankwise train` builds (training/run.py's _prepare,
         load_model, the lora method, make_trainer: preset balanced, batch 16, lr 2e-3) on the 3,000-example
         epoch; timed step to step with a callback (model/Trainer setup and the first step excluded), then
         EXTRAPOLATED to the epoch's ceil(3000 / 16) = 188 steps. Excluding setup makes the epoch cheaper, so
         the ratios are conservative (larger) compared with a whole `rankwise train` epoch.
Peak memory: the largest RSS increase over the RSS before each calibration (sampled every 5 ms), and the
accumulators' own size (`state_bytes`: float64 Grams + float32 gradients).

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/bench_calibration.py   # -> results/bench_calibration.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHARED = HERE.parent.parent / "shared" / "data"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Largest RSS seen (5 ms sampling) minus the RSS at entry."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())
        self.delta = self.peak - self.base


def _trainer(model_path: str, data: str, examples: int, steps: int, seed: int):
    """The Trainer `rankwise train MODEL --data D --max-train-samples N` builds, plus a step clock."""
    from transformers import TrainerCallback, set_seed

    from rankwise.methods import MethodContext, get_method
    from rankwise.training.prepare import make_trainer
    from rankwise.training.run import DEFAULT_LR, _lora_kwargs, _prepare
    from rankwise.training.tasks import load_model

    s = _prepare(model_path, data, "auto", None, None, 0.1, examples, None, None, seed)
    set_seed(seed)
    base = load_model(model_path, s["task"], s["info"])
    ctx = MethodContext(task=s["task"], model_name="minilm", model_path=model_path,
                        lora_kwargs=_lora_kwargs(s["task"], base, model_path, 0.0), choice={"preset": "balanced"},
                        progress=False, seed=seed)
    built = get_method("lora").build(base, ctx)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    trainer = make_trainer(built.model, s["tokenizer"], s["task"], s["info"].label_type, out_dir="/tmp/bench_cal",
                           train_ds=s["train"], lr=DEFAULT_LR[s["task"]], batch_size=16, max_steps=steps,
                           seed=seed, device="cpu", progress=False)
    trainer.add_callback(Clock())
    return trainer, stamps, len(s["train"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED / "sst2"))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--epoch-examples", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=40, help="training steps timed per repeat (then extrapolated)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "bench_calibration.json"))
    args = ap.parse_args(argv)

    import torch

    from rankwise.assets import resolve_model
    from rankwise.stats.calibration import calibrate
    from rankwise.targets import resolve_targets
    from rankwise.training.calibrate import calibration_from_data
    from rankwise.training.run import versions

    model_path = resolve_model("minilm")
    cal = calibration_from_data(model_path, args.data, samples=args.samples, progress=False)
    layers = resolve_targets(cal.model)
    modes = {"act": dataclasses.replace(cal, gradients=False), "grad": dataclasses.replace(cal, activations=False),
             "both": cal}
    trainer, stamps, n_train = _trainer(model_path, args.data, args.epoch_examples, args.steps, 0)
    epoch_steps = math.ceil(n_train / 16)
    times = {k: [] for k in (*modes, "step")}
    peaks = {k: [] for k in modes}
    state = {}
    load = [os.getloadavg()[0]]
    for r in range(args.repeats):
        for name, c in modes.items():  # interleaved with the training steps, so load drifts hit both
            with PeakRss() as mem:
                res = calibrate(cal.model, c, layers)
            times[name].append(res.seconds)
            peaks[name].append(mem.delta)
            state[name] = res.state_bytes
        stamps.clear()
        trainer.train()
        times["step"].append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        load.append(os.getloadavg()[0])
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    epoch = med["step"] * epoch_steps
    result = {
        "benchmark": "bench_calibration",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "loadavg_1min_during": load},
        "versions": versions(),
        "config": {"model": "minilm (all-MiniLM-L6-v2)", "data": args.data, "calib_samples": args.samples,
                   "calib_batch_size": cal.batch_size, "targets": "all-linear", "layers": len(layers),
                   "epoch_examples": n_train, "epoch_steps": epoch_steps, "batch_size": 16,
                   "max_length": "model default (512), dynamic padding",
                   "timed_steps": args.steps, "repeats": args.repeats,
                   "epoch_time": "per-step time (callback, first step and setup excluded) x epoch_steps"},
        "seconds": times,
        "median_seconds": med,
        "epoch_seconds_extrapolated": epoch,
        "ratio_to_epoch": {k: med[k] / epoch for k in modes},
        "peak_rss_increase_bytes": {k: max(v) for k, v in peaks.items()},
        "state_bytes": state,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps({k: result[k] for k in ("median_seconds", "epoch_seconds_extrapolated", "ratio_to_epoch",
                                             "peak_rss_increase_bytes")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
