"""MEASURE: spectral metrics of every target layer, from a live model or a safetensors checkpoint.

    import rankwise.stats as s
    stats = s.analyze("path/to/model", ["query", "value"])   # list[LayerStats], module/checkpoint order
    stats[0].metrics["alpha"]                                 # WeightWatcher-compatible power-law exponent

Pipeline: `sources` yields weight batches bounded in bytes -> `spectral.eigenvalues` (stacked float64 Gram
eigendecomposition, CUDA when available) -> `spectral.spectral_metrics` per layer (see docs/metrics.md).
"""

from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm

from ..types import LayerStats, RankwiseError
from .powerlaw import fit_power_law, hill_alpha
from .sources import WeightSource, open_source
from .spectral import METRIC_NAMES, eigenvalues, resolve_device, spectral_metrics

__all__ = [
    "CPU_BATCH_BYTES",
    "GPU_BATCH_BYTES",
    "METRIC_NAMES",
    "analyze",
    "eigenvalues",
    "fit_power_law",
    "hill_alpha",
    "open_source",
    "spectral_metrics",
]

# Float64 size of the weights read and decomposed together (batch_bytes=None picks one of these). On CPU layers
# are decomposed one at a time anyway (see spectral._cpu_eigvalsh), so the batch only groups reads; peak RSS on
# a 400 MiB checkpoint of 4 MiB layers was +24/+36/+52 MiB for 8/32/64 MiB batches (bench_checkpoint_memory.py).
# On GPU one stacked call per shape is what makes it fast, and the float64 stack lives in GPU memory.
CPU_BATCH_BYTES = 16 * 1024 * 1024
GPU_BATCH_BYTES = 256 * 1024 * 1024


def _check_batch_bytes(batch_bytes, device) -> int:
    if batch_bytes is None:
        return GPU_BATCH_BYTES if device.type == "cuda" else CPU_BATCH_BYTES
    if isinstance(batch_bytes, bool) or not isinstance(batch_bytes, int) or batch_bytes < 0:
        raise RankwiseError(f"batch_bytes must be a non-negative integer (bytes) or None (auto), got {batch_bytes!r}")
    return batch_bytes


def _check_finite(batch) -> None:
    """NaN/Inf weights have no spectrum (the eigensolver would fail deep in LAPACK): name the layer instead."""
    import torch

    for info, w in batch:
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            raise RankwiseError(f"layer {info.name} has non-finite (NaN/Inf) weights; the checkpoint is corrupt")


def analyze(
    source,
    targets: str | Sequence[str] | None = None,
    *,
    device=None,
    progress: bool = True,
    spikes_tracy_widom: bool = False,
    batch_bytes: int | None = None,
) -> list[LayerStats]:
    """Spectral metrics of every target layer of `source`.

    source: an nn.Module, a safetensors file or folder (read tensor by tensor, the model is never built), or
        any other transformers folder/hub id (loaded with AutoModel, trust_remote_code off).
    targets: None/"all-linear" (every Linear/Conv1D but output heads), module names or suffixes, or a regex
        matching whole names (see `rankwise.targets.select_layers`).
    device: "cpu", "cuda", a torch.device, or None for cuda-if-available.
    spikes_tracy_widom: raise the Marchenko-Pastur edge by the Tracy-Widom 95% margin when counting spikes.
    batch_bytes: bound on the float64 size of the weights decomposed together (at least one layer per batch);
        None: 16 MiB on CPU, 256 MiB on CUDA.
    Returns one LayerStats per layer, in module order (checkpoints: natural name order).
    """
    dev = resolve_device(device)
    batch_bytes = _check_batch_bytes(batch_bytes, dev)
    src: WeightSource = open_source(source, targets)
    results: list[LayerStats] = []
    with tqdm(total=len(src), desc="analyze", unit="layer", disable=not progress) as bar:
        for batch in src.batches(batch_bytes):
            _check_finite(batch)
            infos = [info for info, _ in batch]
            evals = eigenvalues([w for _, w in batch], device=dev)
            del batch  # let the weights go before the next read
            for info, ev in zip(infos, evals):
                results.append(LayerStats(info, spectral_metrics(ev, info.shape, spikes_tracy_widom)))
                bar.update(1)
    return results
