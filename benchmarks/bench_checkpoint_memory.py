"""Peak memory of `rankwise.stats.analyze` on a safetensors folder vs the checkpoint's size.

Writes a ~400 MB checkpoint (BERT-style names, 100 float32 layers of 1024 x 1024) to a temp folder, then in a
fresh process: warms up on a tiny model, resets the peak-RSS counter (/proc/self/clear_refs), analyses the
folder and reports VmHWM - VmRSS(before). RSS includes memory-mapped file pages, so this also checks that the
source does not keep the whole file mapped.

    python benchmarks/bench_checkpoint_memory.py            # -> benchmarks/results/bench_checkpoint_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

__all__ = ["measure_checkpoint_memory"]

RESULTS = Path(__file__).resolve().parent / "results"

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import rankwise.stats as s

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    s.analyze(sys.argv[2], progress=False)
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    t = time.perf_counter()
    stats = s.analyze(sys.argv[1], progress=False, batch_bytes=int(sys.argv[3]))
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_increase_bytes": status("VmHWM") - base,
                      "rss_before_bytes": base, "layers": len(stats)}))
    """
)


def _write(folder: Path, n_layers: int, out_f: int, in_f: int) -> int:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {f"encoder.layer.{i}.attention.self.query.weight": torch.randn(out_f, in_f, generator=g)
               for i in range(n_layers)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return (folder / "model.safetensors").stat().st_size


def _tiny(folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(folder)


def measure_checkpoint_memory(n_layers: int = 100, size: int = 1024, batch_mib: tuple[int, ...] = (8, 32, 64)):
    """{checkpoint_bytes, runs: [{batch_bytes, peak_rss_increase_bytes, ratio, seconds}]}; Linux only."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {"skipped": "needs Linux /proc/self/clear_refs to reset peak RSS"}
    with tempfile.TemporaryDirectory(prefix="rankwise-mem-") as tmp:
        tmp = Path(tmp)
        ck_bytes = _write(tmp / "big", n_layers, size, size)
        _tiny(tmp / "tiny")
        runs = []
        for mib in batch_mib:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, str(tmp / "big"), str(tmp / "tiny"), str(mib << 20)],
                capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), check=True,
            )
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["batch_bytes"] = mib << 20
            r["ratio_to_checkpoint"] = r["peak_rss_increase_bytes"] / ck_bytes
            runs.append(r)
    return {"checkpoint_bytes": ck_bytes, "layers": n_layers, "layer_shape": [size, size], "dtype": "float32",
            "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_checkpoint_memory.json")
    args = ap.parse_args(argv)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), **measure_checkpoint_memory(args.layers)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result.get("runs", []):
        print(f"batch {r['batch_bytes'] >> 20:>3} MiB: peak RSS +{r['peak_rss_increase_bytes'] / 2**20:.0f} MiB "
              f"for a {result['checkpoint_bytes'] / 2**20:.0f} MiB checkpoint ({r['ratio_to_checkpoint']:.1%})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
