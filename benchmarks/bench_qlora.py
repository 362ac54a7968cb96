"""QLoRA vs LoRA: memory and step time of a training step with a 4-bit (NF4) base vs the float32 base.

For each model (MiniLM classifier, SmolLM2 causal LM) the two settings run side by side, interleaved
(full, 4bit, full, 4bit, ...), each in a fresh process so peak memory is its own: rankwise's own loading
(`tasks.load_model`, `quantize.prepare`) and the balanced preset's LoRA plan, then `--steps` optimizer steps on a
fixed random batch. Per run: weight memory (`model_memory_bytes`, as in results.json), peak memory of the
training steps (CUDA: max allocated; CPU: peak RSS increase over the steps, /proc/self/clear_refs) and the median
step time. The ratios (4bit / full) are medians over `--repeats`.

    python benchmarks/bench_qlora.py                        # -> benchmarks/results/bench_qlora.json
    python benchmarks/bench_qlora.py --models minilm --repeats 3 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

__all__ = ["measure"]

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"minilm": ("seq-cls", 16, 128), "smollm2": ("causal-lm", 4, 128)}  # task, batch, tokens

_CHILD = textwrap.dedent(
    """
    import json, os, statistics, sys, time
    import torch
    from rankwise.assets import resolve_model
    from rankwise.apply import apply
    from rankwise.training.data import DataInfo
    from rankwise.training.presets import build_plan
    from rankwise.training.quantize import model_memory, prepare, quant_spec
    from rankwise.training.tasks import load_model

    name, task, batch, tokens, quant, steps = sys.argv[1:7]
    batch, tokens, steps = int(batch), int(tokens), int(steps)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    path = resolve_model(name)
    spec = quant_spec(quant) if quant != "none" else None
    info = DataInfo(source="bench", kind="table", text_columns=["text"], label_column="label",
                    label_type="class", num_labels=2)
    model = load_model(path, task, info, quantization=spec, device=dev)
    if spec is not None:
        model = prepare(model)
    else:
        model = model.to(dev)
    plan, _ = build_plan(model, model_name=name, preset="balanced", progress=False)
    heads = [h for h in ("classifier", "score") if hasattr(model, h)]
    peft_model = apply(model, plan, task_type="SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM",
                       modules_to_save=heads or None)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(1000, 20000, (batch, tokens), device=dev)
    labels = torch.randint(0, 2, (batch,), device=dev) if task == "seq-cls" else ids

    def step():
        t = time.perf_counter()
        loss = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    step()  # warm-up: kernels, optimizer state
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        open("/proc/self/clear_refs", "w").write("5")
        base = rss("VmRSS")
    times = [step() for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else rss("VmHWM")
    print(json.dumps({"device": dev, "model_memory_bytes": model_memory(peft_model), "step_s": statistics.median(times),
                      "peak_bytes": peak, "peak_increase_bytes": peak - base,
                      "peak_rss_process_bytes": rss("VmHWM") if dev == "cpu" else None}))
    """
)


def _run(name: str, quant: str, steps: int) -> dict:
    task, batch, tokens = MODELS[name]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, name, task, str(batch), str(tokens), quant, str(steps)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {quant} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(models=("minilm", "smollm2"), repeats: int = 2, steps: int = 5) -> dict:
    """{model: {runs: {none: [...], 4bit: [...]}, ratios: {...}}}; runs interleaved, one fresh process each."""
    out = {}
    for name in models:
        runs = {"none": [], "4bit": []}
        for _ in range(repeats):
            for quant in runs:
                runs[quant].append(_run(name, quant, steps))
        med = {q: {k: statistics.median(r[k] for r in rs) for k in ("model_memory_bytes", "step_s",
                                                                    "peak_bytes", "peak_increase_bytes")}
               for q, rs in runs.items()}
        task, batch, tokens = MODELS[name]
        out[name] = {
            "task": task, "batch": batch, "tokens": tokens, "steps": steps, "repeats": repeats, "runs": runs,
            "median": med,
            "ratios_4bit_over_full": {k: med["4bit"][k] / med["none"][k] for k in med["none"] if med["none"][k]},
        }
    return out


def _versions() -> dict:
    import rankwise  # noqa: F401  (quiets bitsandbytes' import-time note about an optional package)
    import bitsandbytes
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_qlora.json")
    args = ap.parse_args(argv)
    if not os.path.exists("/proc/self/status"):
        print("needs Linux /proc for peak RSS", file=sys.stderr)
        return 1
    results = measure(args.models, args.repeats, args.steps)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": {"platform": platform.platform(),
           "processor": platform.processor(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
           "versions": _versions(), "settings": {"quantization": "4bit nf4, compute float32", "preset": "balanced"},
           "models": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(args.out)
    for name, r in results.items():
        q = r["ratios_4bit_over_full"]
        print(f"{name}: weights x{q['model_memory_bytes']:.2f}, step peak memory x{q['peak_bytes']:.2f} "
              f"(increase x{q.get('peak_increase_bytes', float('nan')):.2f}), step time x{q['step_s']:.2f} "
              f"(4bit / full, {r['median']['none']['step_s']:.2f}s -> {r['median']['4bit']['step_s']:.2f}s)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
