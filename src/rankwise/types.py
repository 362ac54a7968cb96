"""Plain data types shared by every stage: what a layer is, what we measured, what a budget is, what was decided.

Ranks and masks never share a name here: a `RankPattern` holds integer ranks only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["LayerInfo", "LayerStats", "Budget", "RankPattern", "RankwiseError", "RankwiseFailure"]


class RankwiseError(ValueError):
    """A user-facing error: the message says what was wrong and what is allowed."""


class RankwiseFailure(RuntimeError):
    """A run that failed at run time although its input was valid (e.g. the loss became NaN): the CLI prints the
    message as one line and exits 1, and no output folder claims success."""


@dataclass(frozen=True)
class LayerInfo:
    """One adaptable layer, by its fully qualified module name.

    `out_features`/`in_features` follow nn.Linear's convention even for GPT-2's Conv1D (whose weight is stored
    transposed), so `params_per_rank` is always `in + out`.
    """

    name: str
    out_features: int
    in_features: int
    kind: str = "linear"  # "linear" | "conv1d"
    module_type: str = "other"  # "attention" | "mlp" | "other"
    depth: int | None = None  # index of the transformer block, when the name has one

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def params_per_rank(self) -> int:
        return self.out_features + self.in_features

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": [self.out_features, self.in_features],
            "kind": self.kind,
            "module_type": self.module_type,
            "depth": self.depth,
        }


@dataclass
class LayerStats:
    """A layer plus whatever was measured on it (empty `metrics` when only its shape is known)."""

    info: LayerInfo
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    def __getitem__(self, key: str) -> float:
        try:
            return self.metrics[key]
        except KeyError:
            raise RankwiseError(
                f"layer {self.name!r} has no metric {key!r}; measured: {sorted(self.metrics) or 'none'} "
                "(run rankwise.analyze on the model first)"
            ) from None

    def to_dict(self) -> dict:
        return {**self.info.to_dict(), **self.metrics}


@dataclass(frozen=True)
class Budget:
    """A budget in trainable LoRA parameters: sum over layers of r * (in + out). `spec` records how it was given."""

    params: int
    spec: str = ""

    def __post_init__(self):
        if not isinstance(self.params, int) or self.params <= 0:
            raise RankwiseError(f"budget must be a positive number of parameters, got {self.params!r}")

    def to_dict(self) -> dict:
        return {"params": self.params, "spec": self.spec or str(self.params)}


@dataclass(frozen=True)
class RankPattern:
    """What an allocator decided: an integer rank per fully qualified layer name (0 = not adapted).

    `alphas` (lora_alpha per layer) is optional; when absent the plan uses `alpha_factor * rank`.
    `scores` are the per-layer scores the allocator ranked layers by, kept for the plan's table.
    """

    ranks: Mapping[str, int]
    alphas: Mapping[str, float] | None = None
    scores: Mapping[str, float] | None = None

    def spent(self, layers: Mapping[str, LayerInfo]) -> int:
        return sum(r * layers[name].params_per_rank for name, r in self.ranks.items())
