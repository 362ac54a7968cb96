"""MEASURE with data: activation and gradient statistics of the target layers on a calibration sample.

    cal = Calibration(train_examples, collate, model=model_with_head, samples=256, seed=0)
    result = calibrate(model_with_head, cal, [s.info for s in stats])
    stats = with_data_metrics(stats, result)           # LayerStats rows gain the DATA_METRICS columns

One pass over `samples` examples (a seeded subset of what the caller hands in: rankwise only ever hands in the
training split), batch by batch, the model in eval mode (no dropout: the statistics are deterministic), weights
never updated, the global RNG left as it was (LoRA initialisation after calibration is unchanged):
- forward hooks on each target layer see its input x and output y at every real token (padded positions,
  attention_mask == 0, are dropped): mean ||x||^2, mean ||y||^2 and the input Gram matrix sum x x^T, summed in
  float64 (float32 puts ~1e-7 * lambda_max of noise on the zero eigenvalues of a rank-deficient Gram, and their
  square roots move the effective rank in the third digit). Its eigenvalues (the uncentered input covariance;
  its eigenvectors are the right singular vectors of the stacked activations, what EVA computes) give the
  effective rank and the explained-variance ratios.
- one backward per batch of the model's own loss (labels of -100, and so padding, are ignored by it) gives
  dL/dW for each target weight; batch gradients are summed weighted by the batch's number of loss terms
  (examples, or target tokens for causal LM), so G is the gradient of the mean loss over the whole sample.

Memory, independent of the number of examples: one float64 in_features^2 Gram per target layer (MiniLM
all-linear: 30 x 384^2 + 6 x 1536^2 x 8 B = 148 MiB) and one float32 gradient the size of each target weight
(MiniLM: 42 MiB), plus one batch's activations and graph.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from ..metric_names import (ACTIVATION_METRICS, DATA_METRICS, EVR_PREFIX, GRADIENT_METRICS, evr_key,  # noqa: F401
                            is_data_metric)
from ..targets import adaptable_layers, match_names
from ..types import LayerInfo, LayerStats, RankwiseError
from .spectral import effective_rank

__all__ = ["ACTIVATION_METRICS", "GRADIENT_METRICS", "DATA_METRICS", "EVR_PREFIX", "Calibration",
           "CalibrationResult", "calibrate", "with_data_metrics", "evr_key", "is_data_metric"]

@dataclass
class Calibration:
    """What to calibrate on: encoded training examples, the collator that batches them, and the model with its
    task head (None: the model being planned, when it is a module)."""

    dataset: Any  # a datasets.Dataset or a list of dicts (input_ids, attention_mask, labels, ...)
    collate: Callable
    model: nn.Module | None = None
    data: str | None = None  # where the examples came from, recorded in plan.json
    samples: int = 256
    seed: int = 0
    batch_size: int = 16
    top_k: int = 8  # act_explained_topk = variance share of the top_k input directions
    components: int = 32  # explained-variance ratios kept per layer (act_evr_1..components)
    activations: bool = True
    gradients: bool = True
    device: Any = None  # None: where the model is
    task: str | None = None

    def spec(self) -> dict:
        return {"data": self.data, "split": "train", "samples": self.samples, "seed": self.seed,
                "batch_size": self.batch_size, "top_k": self.top_k, "components": self.components,
                "task": self.task, "activations": self.activations, "gradients": self.gradients}


@dataclass
class CalibrationResult:
    metrics: dict[str, dict[str, float]]  # by the layer names asked for
    spectra: dict[str, list[float]] = field(default_factory=dict)  # explained-variance ratios, top `components`
    examples: int = 0
    tokens: int = 0  # real (unpadded) tokens seen by the hooks' model input
    loss_terms: int = 0
    seconds: float = 0.0
    state_bytes: int = 0  # the accumulators' size: the memory bound stated above

    def record(self, cal: Calibration) -> dict:
        """The plan.json "calibration" field: spec, what was seen, and each layer's spectrum."""
        return {**cal.spec(), "examples": self.examples, "tokens": self.tokens, "loss_terms": self.loss_terms,
                "seconds": round(self.seconds, 3), "state_bytes": self.state_bytes,
                "layers": {n: {"explained_variance": [round(v, 8) for v in s]} for n, s in self.spectra.items()}}


# ----- sampling and batching ----------------------------------------------------------------------------------
def _pick(dataset, n: int, seed: int):
    """A seeded subset of n examples (datasets' own shuffle, so `plan` and `train` pick the same rows)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RankwiseError(f"--calib-samples must be a positive integer, got {n!r}")
    size = len(dataset)
    if size == 0:
        raise RankwiseError("the calibration data has no examples")
    if n >= size:
        return dataset
    if hasattr(dataset, "shuffle") and hasattr(dataset, "select"):
        return dataset.shuffle(seed=seed).select(range(n))
    return [dataset[i] for i in sorted(random.Random(seed).sample(range(size), n))]


def _batches(dataset, collate, batch_size: int, device):
    """Batches of examples of similar length. Every statistic is a sum over examples (gradients weighted by their
    loss terms), so the grouping changes no number; it only cuts the padded positions every batch computes."""
    rows = [dataset[i] for i in range(len(dataset))]
    if all("input_ids" in r for r in rows):
        rows.sort(key=lambda r: len(r["input_ids"]))  # stable: ties keep the seeded order
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size])
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in dict(batch).items()}


def _loss_terms(labels: torch.Tensor | None) -> int:
    """How many terms the model's mean loss averages: target tokens after the causal shift, else examples."""
    if labels is None:
        raise RankwiseError("gradient statistics need labelled calibration examples (a 'labels' column)")
    if labels.dim() == 2 and not labels.is_floating_point():
        return int((labels[:, 1:] != -100).sum())  # causal LM: token t predicts t+1; -100 is ignored
    return int(labels.shape[0])


# ----- hooks --------------------------------------------------------------------------------------------------
class _Acc:
    """Running sums for one layer's activations. On CPU the float64 Gram is a Fortran-order array that BLAS dsyrk
    updates in place (G += x^T x, upper triangle only): half a matmul's flops and no separate pass to add a batch's
    product (a float64 add of a 1536^2 matrix costs as much as a third of its dsyrk)."""

    def __init__(self, in_features: int, device):
        self.cpu = torch.device(device).type == "cpu"
        if self.cpu:
            self.gram = np.zeros((in_features, in_features), dtype=np.float64, order="F")
        else:
            self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.out_sq = 0.0
        self.count = 0

    def add_inputs(self, xs: torch.Tensor) -> None:
        """G += xs^T xs for one batch's [tokens, in] inputs."""
        if not self.cpu:
            x64 = xs.to(torch.float64)
            self.gram.addmm_(x64.mT, x64)
            return
        from scipy.linalg.blas import dsyrk

        if xs.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16
            xs = xs.to(torch.float32)
        a = np.asarray(xs.numpy(), dtype=np.float64, order="F")  # [tokens, in], Fortran order: BLAS takes it as is
        self.gram = dsyrk(1.0, a, beta=1.0, c=self.gram, trans=1, overwrite_c=1)  # in place: c is Fortran order

    def mean_gram(self) -> np.ndarray:
        """The mean input Gram (upper triangle filled on CPU; the eigensolver and the trace read only that)."""
        g = self.gram if self.cpu else self.gram.cpu().numpy()
        return g / self.count


def _real_tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[tokens, features]: a [batch, seq, f] tensor keeps only positions where the attention mask is 1."""
    t = t.detach()
    if t.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(t.shape[:2]):
        return t[mask.bool()]
    return t.reshape(-1, t.shape[-1])


class _Hooks:
    def __init__(self, modules: dict[str, nn.Module], infos: dict[str, LayerInfo], device):
        self.acc = {n: _Acc(infos[n].in_features, device) for n in modules}
        self.mask: torch.Tensor | None = None
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def fn(module, inputs, output):
            acc = self.acc[name]
            # q/k/v read one input and each does its own dsyrk: a shared product would need a separate add pass,
            # which costs more than the extra 384^2 products it saves
            acc.add_inputs(_real_tokens(inputs[0], self.mask))
            ys = _real_tokens(output, self.mask).to(torch.float64)
            acc.out_sq += float(ys.pow(2).sum())
            acc.count += ys.shape[0]

        return fn

    def next_batch(self, mask) -> None:
        self.mask = mask

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ----- the pass -----------------------------------------------------------------------------------------------
def _resolve(model: nn.Module, layers: Sequence[LayerInfo]) -> tuple[dict[str, nn.Module], dict[str, LayerInfo]]:
    """{asked name: module} (a plan made on a bare encoder names `encoder...`, the head model `bert.encoder...`)."""
    found = {lay.name: lay for lay in adaptable_layers(model)}
    mapping = match_names([lay.name for lay in layers], list(found))
    mods = dict(model.named_modules())
    for lay in layers:
        real = found[mapping[lay.name]]
        if real.shape != lay.shape:
            raise RankwiseError(f"layer {lay.name} is {list(lay.shape)} in the plan but {list(real.shape)} in the "
                                "calibration model; calibrate the model you plan for")
    return {lay.name: mods[mapping[lay.name]] for lay in layers}, {lay.name: lay for lay in layers}


def calibrate(model: nn.Module, cal: Calibration, layers: Sequence[LayerInfo], *,
              progress: bool = False) -> CalibrationResult:
    """Activation and/or gradient statistics of `layers` (see the module docstring) on `cal.samples` examples."""
    if not (cal.activations or cal.gradients):
        raise RankwiseError("calibration needs activations or gradients (or both)")
    if cal.batch_size < 1 or cal.top_k < 1 or cal.components < 1:
        raise RankwiseError("calibration batch_size, top_k and components must be >= 1")
    modules, infos = _resolve(model, layers)
    packed = [n for n, m in modules.items() if cal.gradients and not m.weight.is_floating_point()]
    if packed:  # bitsandbytes' packed 4/8-bit weights take no gradient (torch's error names no way out)
        raise RankwiseError(f"gradient calibration needs float weights, and {packed[0]} is quantised (--quantize): "
                            "plan on the full-precision model (rankwise plan MODEL --strategy S --data D --out P), "
                            "then train with --plan P --quantize ...")
    data = _pick(cal.dataset, cal.samples, cal.seed)
    home = next(model.parameters()).device
    device = torch.device(cal.device) if cal.device is not None else home
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    weights = {n: m.weight for n, m in modules.items()}
    cuda = [device.index or 0] if device.type == "cuda" else []
    start = time.perf_counter()
    # scipy's BLAS (dsyrk, the eigensolver) gets one thread: its idle threads spin after every call and take the
    # cores from torch's own threads between calls (measured on MiniLM, 2 cores: 10 s with two BLAS threads,
    # 3.6 s with one)
    with threadpool_limits(1, user_api="blas"):
        try:
            model.to(device).eval()
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(cal.seed)
                sums = _run(model, cal, data, modules, infos, weights, device, progress)
        finally:
            model.train(was_training)
            for p, f in flags.items():
                p.requires_grad_(f)
            model.to(home)
        seconds = time.perf_counter() - start
        return _finish(sums, cal, infos, weights, len(data), seconds)


def _run(model, cal, data, modules, infos, weights, device, progress) -> dict:
    from tqdm.auto import tqdm

    hooks = _Hooks(modules, infos, device) if cal.activations else None
    grads = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()} if cal.gradients else None
    if grads is not None:  # only the target weights need dL/dW; nothing else is differentiated
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
    terms = tokens = 0
    n_batches = math.ceil(len(data) / cal.batch_size)
    try:
        for batch in tqdm(_batches(data, cal.collate, cal.batch_size, device), total=n_batches,
                          desc="calibrate", unit="batch", disable=not progress):
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
            if hooks is not None:
                hooks.next_batch(mask)
            if grads is None:
                with torch.no_grad():
                    model(**batch)
                continue
            n = _loss_terms(batch.get("labels"))
            out = model(**batch)
            if n == 0:  # every target masked: the loss is 0/0; the activations were still seen
                continue
            dws = torch.autograd.grad(out.loss, list(weights.values()), allow_unused=True)
            for name, dw in zip(weights, dws):
                if dw is not None:
                    grads[name].add_(dw.detach().float(), alpha=float(n))
            terms += n
    finally:
        if hooks is not None:
            hooks.remove()
    if grads is not None and terms == 0:
        raise RankwiseError("no calibration example has a target (every label is -100); use more --calib-samples")
    return {"hooks": hooks, "grads": grads, "terms": terms, "tokens": tokens}


def _eigen(gram: np.ndarray) -> np.ndarray:
    """Descending eigenvalues of a symmetric float64 matrix (LAPACK syevd, as the weight spectra)."""
    from scipy.linalg import eigvalsh

    ev = eigvalsh(gram, lower=False, check_finite=False, driver="evd")  # the upper triangle
    return np.clip(ev[::-1], 0.0, None)


def _activation_metrics(acc: _Acc, top_k: int, components: int) -> tuple[dict, list[float]]:
    if acc.count == 0:
        raise RankwiseError("a target layer saw no real token during calibration (empty inputs?)")
    gram = acc.mean_gram()
    ev = _eigen(gram)
    total = float(ev.sum())
    evr = ev / total if total > 0 else np.zeros_like(ev)
    m = {"act_in_norm2": float(np.trace(gram)), "act_out_norm2": acc.out_sq / acc.count,
         "act_effective_rank": effective_rank(ev), "act_explained_topk": float(evr[:top_k].sum())}
    kept = [float(v) for v in evr[:components]]
    m.update({evr_key(i + 1): v for i, v in enumerate(kept)})
    return m, kept


def _gradient_metrics(g: torch.Tensor, w: torch.Tensor) -> dict:
    g64, w64 = g.detach().cpu().double(), w.detach().cpu().double()
    fro = float(torch.linalg.matrix_norm(g64))
    # sigma_1^2 is the largest eigenvalue of the small-side Gram: one [k, k] eigensolve instead of a full SVD
    small = g64.mT @ g64 if g64.shape[0] >= g64.shape[1] else g64 @ g64.mT
    top = math.sqrt(max(float(torch.linalg.eigvalsh(small)[-1]), 0.0)) if fro > 0 else 0.0
    return {"grad_norm": fro, "grad_sensitivity": float((w64 * g64).abs().sum()),
            "grad_stable_rank": fro * fro / (top * top) if top > 0 else 0.0}


def _finish(sums: dict, cal: Calibration, infos, weights, examples: int, seconds: float) -> CalibrationResult:
    metrics: dict[str, dict[str, float]] = {n: {} for n in infos}
    spectra: dict[str, list[float]] = {}
    state = 0
    if sums["hooks"] is not None:
        for name, acc in sums["hooks"].acc.items():
            metrics[name], spectra[name] = _activation_metrics(acc, cal.top_k, cal.components)
            state += acc.gram.size * 8 if acc.cpu else acc.gram.numel() * 8
    if sums["grads"] is not None:
        for name, g in sums["grads"].items():
            metrics[name].update(_gradient_metrics(g / sums["terms"], weights[name]))
            state += g.numel() * 4
    return CalibrationResult(metrics, spectra, examples, sums["tokens"], sums["terms"], seconds, state)


def with_data_metrics(stats: Sequence[LayerStats], result: CalibrationResult) -> list[LayerStats]:
    """New LayerStats rows: each layer's metrics plus its data metrics (same order, same names)."""
    missing = [s.name for s in stats if s.name not in result.metrics]
    if missing:
        raise RankwiseError(f"no calibration statistics for {missing[:3]}; calibrate the same target layers")
    return [LayerStats(s.info, {**s.metrics, **result.metrics[s.name]}) for s in stats]
