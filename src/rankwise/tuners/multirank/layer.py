"""`MultiRankLinear`: a frozen nn.Linear (or GPT-2 Conv1D) plus multi-rank branches, fused.

All branches of one adapter live in ONE A of shape (sum r_i, in) and ONE B of shape (out, sum r_i); branch i owns
rows/columns offset_i .. offset_i + r_i. The per-branch factor s_i * c_i is expanded over the branch's components
(a vector of length sum r_i), so a forward is two matmuls and one elementwise product:

    y = base(x) + ((dropout(x) @ A.T) * gain) @ B.T,    gain[k] = s_i * c_i for every component k of branch i

which is exactly sum_i s_i c_i B_i A_i x, without 2 x len(ranks) small matmuls.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ...types import RankwiseError
from .config import branch_scales, initial_coefficients

__all__ = ["MultiRankLinear", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (in, out): LoRA runs it with fan_in_fan_out."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return False
    return isinstance(module, Conv1D)


class MultiRankLinear(nn.Module):
    """Replaces one target module; holds any number of named adapters, one of them active."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):
            raise RankwiseError(f"multi-rank adapts nn.Linear and GPT-2 Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1],
                                                                                                    w.shape[0])
        self.multirank_A = nn.ParameterDict()
        self.multirank_B = nn.ParameterDict()
        self.multirank_coefficients = nn.ParameterDict()
        self.multirank_dropout = nn.ModuleDict()
        self.ranks: dict[str, list[int]] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, str] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapters: list[str] = []

    # ----- adapters ----------------------------------------------------------------------------------------
    def add_adapter(self, name: str, ranks: Sequence[int], lora_alpha: float, scaling: str, coefficient_init: str,
                    lora_dropout: float = 0.0, generator: torch.Generator | None = None) -> None:
        """A (sum r, in) Kaiming-uniform, B (out, sum r) zero: the adapted layer starts equal to the base layer."""
        w = self.base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        total = sum(ranks)
        a = torch.empty(total, self.in_features, dtype=dtype, device=w.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # fan_in = in, as for each branch alone
        self.multirank_A[name] = nn.Parameter(a)
        self.multirank_B[name] = nn.Parameter(torch.zeros(self.out_features, total, dtype=dtype, device=w.device))
        coef = initial_coefficients(len(ranks), coefficient_init, generator)
        self.multirank_coefficients[name] = nn.Parameter(coef.to(dtype=dtype, device=w.device))
        self.multirank_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.ranks[name], self.lora_alpha[name], self.scaling[name] = list(ranks), float(lora_alpha), scaling
        # constants of the fused forward; not saved (the config rebuilds them)
        scales = torch.tensor(branch_scales(ranks, lora_alpha, scaling), dtype=dtype, device=w.device)
        branch = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(list(ranks))).to(w.device)
        self.register_buffer(f"_scales_{name}", scales, persistent=False)
        self.register_buffer(f"_branch_{name}", branch, persistent=False)
        if self.active_adapter is None:
            self.set_adapter(name)

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter; only its parameters are trainable (as in peft). A layer that is not a
        target of `name` runs as its base layer meanwhile."""
        self.active_adapter = name
        for n in self.multirank_A:
            for d in (self.multirank_A, self.multirank_B, self.multirank_coefficients):
                d[n].requires_grad_(n == name)

    def scales(self, name: str) -> torch.Tensor:
        return getattr(self, f"_scales_{name}")

    def gain(self, name: str) -> torch.Tensor:
        """s_i * c_i expanded over each branch's r_i components: a vector of length sum r_i."""
        return (self.scales(name) * self.multirank_coefficients[name])[getattr(self, f"_branch_{name}")]

    def offsets(self, name: str) -> list[int]:
        out, acc = [], 0
        for r in self.ranks[name]:
            out.append(acc)
            acc += r
        return out

    # ----- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        out = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.disabled or name is None or name not in self.multirank_A or name in self.merged_adapters:
            return out
        a, b = self.multirank_A[name], self.multirank_B[name]
        h = F.linear(self.multirank_dropout[name](x.to(a.dtype)), a) * self.gain(name)
        return out + F.linear(h, b).to(out.dtype)

    # ----- merge -------------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """sum_i s_i c_i B_i A_i as an (out, in) matrix."""
        return self.multirank_B[name] @ (self.gain(name)[:, None] * self.multirank_A[name])

    def _add_to_base(self, delta: torch.Tensor, sign: float) -> None:
        w = self.base_layer.weight
        with torch.no_grad():
            w.add_((delta.T if self.fan_in_fan_out else delta).to(w.dtype), alpha=sign)

    def merge(self, name: str | None = None) -> None:
        name = name or self.active_adapter
        if name is None or name not in self.multirank_A or name in self.merged_adapters:
            return
        self._add_to_base(self.delta_weight(name).detach(), 1.0)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._add_to_base(self.delta_weight(self.merged_adapters.pop()).detach(), -1.0)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.ranks}, active={self.active_adapter}"
