"""PlainLora arithmetic shared by every method and every export format: the scaled deltas of each layer, their SVD
compression, and a PlainLora built from exact deltas.

It lives beside the methods (not in exporting.py) because methods use it for their own `to_lora`, and exporting
imports the methods: a home both sides import keeps the two from importing each other. Importing it costs no
torch; the functions import torch and peft when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..types import RankwiseError
from .base import PlainLora

if TYPE_CHECKING:
    import torch

__all__ = ["lora_deltas", "compress_lora", "plain_from_deltas"]


def lora_deltas(plain: PlainLora) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module prefix: (A (r, in), B (out, r), scaling)} of every LoRA layer, scaling as peft computes it."""
    cfg = plain.config
    out = {}
    for key, a in plain.tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        prefix = key[: -len(".lora_A.weight")]
        b = plain.tensors[prefix + ".lora_B.weight"]
        r = a.shape[0]
        alpha = _pattern_value(cfg.alpha_pattern, prefix, cfg.lora_alpha)
        scale = alpha / (r ** 0.5 if cfg.use_rslora else r)
        out[prefix] = (a, b, float(scale))
    return out


def _pattern_value(pattern: dict, prefix: str, default):
    """peft matches pattern keys as regexes against the module name; ours are fully qualified and escaped."""
    import re

    name = prefix.removeprefix("base_model.model.")
    for key, v in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return v
    return default


def compress_lora(plain: PlainLora, *, rank: int | None = None, energy: float | None = None) -> PlainLora:
    """SVD of each layer's scaled delta B A, truncated to `rank` or to the fewest components keeping `energy` of
    the squared singular values. Written with alpha = rank, so peft's scaling is 1 and the singular values sit in B.
    Layers whose delta is exactly zero are left out."""
    if (rank is None) == (energy is None):
        raise RankwiseError("give exactly one of --rank K or --energy E to compress")
    if rank is not None and rank < 1:
        raise RankwiseError(f"--rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise RankwiseError(f"--energy must be in (0, 1], got {energy}")
    import torch

    tensors = {k: v for k, v in plain.tensors.items() if ".lora_A." not in k and ".lora_B." not in k}
    ranks = {}
    for prefix, (a, b, scale) in lora_deltas(plain).items():
        delta = (b.double() * scale) @ a.double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        if rank is not None:
            k = min(rank, int((s > s[0] * 1e-12).sum()) if s.numel() and s[0] > 0 else 0)
        else:
            cum = torch.cumsum(s ** 2, 0) / (s ** 2).sum().clamp_min(1e-300)
            k = int((cum < energy - 1e-12).sum()) + 1 if s.numel() and s[0] > 0 else 0
        if k == 0:
            continue
        tensors[prefix + ".lora_A.weight"] = vh[:k].to(a.dtype).contiguous()
        tensors[prefix + ".lora_B.weight"] = (u[:, :k] * s[:k]).to(b.dtype).contiguous()
        ranks[prefix.removeprefix("base_model.model.")] = k
    return PlainLora(_config_with_ranks(plain.config, ranks), tensors)


def _config_with_ranks(config, ranks: dict[str, int]):
    """A LoraConfig adapting exactly `ranks` (fully qualified names), alpha = rank (scaling 1)."""
    from collections import Counter

    from peft import LoraConfig

    from ..targets import peft_patterns

    if not ranks:
        raise RankwiseError("every layer's update is zero: nothing to export")
    d = config.to_dict()
    for k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
              "peft_type", "auto_mapping", "revision"):
        d.pop(k, None)
    d = {k: v for k, v in d.items() if k in LoraConfig.__dataclass_fields__}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    return LoraConfig(r=r0, lora_alpha=r0, target_modules=sorted(ranks), rank_pattern=peft_patterns(ranks),
                      alpha_pattern=peft_patterns({n: float(r) for n, r in ranks.items()}), use_rslora=False, **d)


def plain_from_deltas(config, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]], extra: dict) -> PlainLora:
    """Build a PlainLora from {module name: (A (r, in), B (out, r))} with scaling folded into B (alpha = r).
    Methods use this for their exact export; `extra` carries modules_to_save tensors unchanged."""
    tensors = dict(extra)
    ranks = {}
    for name, (a, b) in deltas.items():
        if a.shape[0] == 0:
            continue  # pruned to rank 0: left out of the targets
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        ranks[name] = int(a.shape[0])
    return PlainLora(_config_with_ranks(config, ranks), tensors)
