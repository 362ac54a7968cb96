"""Training-step time of multi-rank LoRA: fused vs peft LoRA of the same total rank vs the per-branch loop.

MiniLM-L6 (sequence classification head), batch 16, sequence 64, every attention and feed-forward projection
(36 layers), ranks [32, 16, 8, 4, 2]:
  - lora:  peft LoRA of rank 62 (= 32 + 16 + 8 + 4 + 2) on the same layers
  - fused: rankwise's MultiRankLinear (one A, one B, an expanded gain: two matmuls + one product)
  - loop:  the original design, one (A_i, B_i) nn.Linear pair per branch run in a Python loop
A step is forward + backward + AdamW step. The three models are timed interleaved (lora, fused, loop, lora, ...)
so machine load hits all alike; each sample is the mean of `--steps` steps. Reported: the ratio of the medians of
`--repeats` samples, and the median of the per-repeat ratios (samples taken back to back, robust to load drift).

    python benchmarks/bench_multirank.py            # -> benchmarks/results/bench_multirank.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["LoopMultiRank", "build", "measure"]

RESULTS = Path(__file__).resolve().parent / "results"
RANKS = [32, 16, 8, 4, 2]


class LoopMultiRank(nn.Module):
    """The design rankwise replaced: each branch its own pair of nn.Linear, summed in a loop."""

    def __init__(self, base: nn.Linear, ranks, alpha: float):
        super().__init__()
        self.base = base
        self.a = nn.ModuleList(nn.Linear(base.in_features, r, bias=False) for r in ranks)
        self.b = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for r in ranks)
        for b in self.b:
            nn.init.zeros_(b.weight)
        self.coefficients = nn.Parameter(torch.ones(len(ranks)))
        self.scale = alpha / max(ranks)

    def forward(self, x):
        out = self.base(x)
        for i, (a, b) in enumerate(zip(self.a, self.b)):
            out = out + self.scale * self.coefficients[i] * b(a(x))
        return out


def _base():
    from transformers import AutoModelForSequenceClassification

    from rankwise.assets import minilm_path

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=2)


def build(kind: str, device: str):
    """(model, trainable parameters) for one variant; the base is frozen in all three."""
    from rankwise.targets import resolve_targets

    model = _base()
    names = [i.name for i in resolve_targets(model, "all-linear")]
    alpha = 2.0 * max(RANKS)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=sum(RANKS), lora_alpha=alpha, target_modules=names))
    elif kind == "fused":
        from rankwise.tuners.multirank import MultiRankConfig, get_multirank_model

        model = get_multirank_model(model, MultiRankConfig(ranks=RANKS, lora_alpha=alpha, target_modules=names))
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoopMultiRank(model.get_submodule(name), RANKS, alpha))
    model.to(device).train()
    return model, [p for p in model.parameters() if p.requires_grad]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _steps(model, opt, batch, n: int, device: str) -> float:
    """Mean seconds per training step over n steps."""
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - t) / n


def measure(repeats: int = 7, steps: int = 3, batch_size: int = 16, seq: int = 64, device: str = "cpu") -> dict:
    kinds = ("lora", "fused", "loop")
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 30000, (batch_size, seq), generator=g).to(device),
             "attention_mask": torch.ones(batch_size, seq, dtype=torch.long, device=device),
             "labels": torch.randint(0, 2, (batch_size,), generator=g).to(device)}
    models, opts, counts = {}, {}, {}
    for k in kinds:
        models[k], params = build(k, device)
        opts[k] = torch.optim.AdamW(params, lr=1e-4)
        counts[k] = sum(p.numel() for p in params)
        _steps(models[k], opts[k], batch, 2, device)  # warm-up: allocator, optimizer state
    samples = {k: [] for k in kinds}
    for _ in range(repeats):
        for k in kinds:  # interleaved: load changes hit every variant alike
            samples[k].append(_steps(models[k], opts[k], batch, steps, device))
    med = {k: statistics.median(v) for k, v in samples.items()}
    # ratios of samples taken back to back in the same repeat: robust to load that drifts between repeats
    paired = {"fused_over_lora": statistics.median(f / lo for f, lo in zip(samples["fused"], samples["lora"])),
              "loop_over_fused": statistics.median(lp / f for lp, f in zip(samples["loop"], samples["fused"]))}
    return {"median_step_s": med, "samples_s": samples, "trainable_params": counts,
            "ratio_fused_over_lora": med["fused"] / med["lora"], "speedup_fused_over_loop": med["loop"] / med["fused"],
            "paired_median_ratios": paired,
            "config": {"model": "all-MiniLM-L6-v2 (seq-cls)", "targets": "all-linear (36 layers)", "ranks": RANKS,
                       "lora_rank": sum(RANKS), "batch_size": batch_size, "seq": seq, "repeats": repeats,
                       "steps_per_sample": steps, "device": device, "threads": torch.get_num_threads()}}


def _versions() -> dict:
    import peft
    import transformers

    import rankwise

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "rankwise": rankwise.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_multirank.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = measure(args.repeats, args.steps, device=args.device)
    result.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), versions=_versions(),
                  machine={"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    med = result["median_step_s"]
    print("  ".join(f"{k} {v * 1000:.1f} ms" for k, v in med.items()))
    paired = result["paired_median_ratios"]
    print(f"fused / lora = {result['ratio_fused_over_lora']:.3f} (paired {paired['fused_over_lora']:.3f}; target "
          f"<= 1.05); loop / fused = {result['speedup_fused_over_loop']:.2f}x (paired "
          f"{paired['loop_over_fused']:.2f}x; target >= 1.5)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
