"""`MultiRankConfig`: several LoRA branches per layer (ranks r_1 > r_2 > ...), each with a learned coefficient.

    delta_W x = sum_i s_i * c_i * B_i A_i x

`s_i` is fixed by `scaling` and `lora_alpha`; `c_i` is trained and starts from `coefficient_init`. The config is
saved as `multirank_config.json` with a format name, a schema number and the rankwise version, so a folder written
by a newer rankwise fails to load with a clear "upgrade" message instead of loading wrong.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ...types import RankwiseError

__all__ = ["MultiRankConfig", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "SCHEMA", "COEFFICIENT_INITS", "SCALINGS",
           "parse_ranks", "branch_scales", "initial_coefficients"]

CONFIG_NAME = "multirank_config.json"
WEIGHTS_NAME = "multirank_model.safetensors"
FORMAT = "rankwise-multirank"
SCHEMA = 1
COEFFICIENT_INITS = ("ones", "normal", "geometric")
SCALINGS = ("max", "per_branch", "rslora")


def parse_ranks(ranks) -> list[int]:
    """`"32,16,8,4,2"` or `[32, 16, 8, 4, 2]` -> a list of distinct positive ints, or a one-line RankwiseError."""
    if isinstance(ranks, str):
        items = [t.strip() for t in ranks.split(",")]
        if not any(items):
            raise RankwiseError("--ranks is empty; give branch ranks separated by commas, e.g. 32,16,8,4,2")
        try:
            ranks = [int(t) for t in items]
        except ValueError:
            raise RankwiseError(f"--ranks must be integers separated by commas, e.g. 32,16,8,4,2; got {ranks!r}") \
                from None
    elif isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = [ranks]
    if not isinstance(ranks, (list, tuple)) or not ranks:
        raise RankwiseError(f"ranks must be a non-empty list of positive integers, e.g. 32,16,8,4,2; got {ranks!r}")
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise RankwiseError(f"every rank must be a positive integer, got {list(ranks)}")
    dupes = sorted({r for r in ranks if list(ranks).count(r) > 1})
    if dupes:
        raise RankwiseError(f"ranks must be distinct (one branch per rank), got {list(ranks)} with {dupes} repeated")
    return [int(r) for r in ranks]


def branch_scales(ranks: Sequence[int], lora_alpha: float, scaling: str) -> list[float]:
    """The fixed scale s_i of each branch: alpha / max(ranks), alpha / r_i, or alpha / sqrt(r_i)."""
    if scaling == "max":
        return [lora_alpha / max(ranks)] * len(ranks)
    if scaling == "per_branch":
        return [lora_alpha / r for r in ranks]
    if scaling == "rslora":
        return [lora_alpha / math.sqrt(r) for r in ranks]
    raise RankwiseError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")


def initial_coefficients(n: int, init: str, generator=None):
    """c_i at the start: N(0, 1) ("normal", the original design), all 1 ("ones"), or 1, 1/2, 1/4 ("geometric")."""
    import torch

    if init == "ones":
        return torch.ones(n)
    if init == "geometric":
        return torch.tensor([0.5 ** i for i in range(n)])
    if init == "normal":
        return torch.randn(n, generator=generator)
    raise RankwiseError(f"coefficient_init must be one of {', '.join(COEFFICIENT_INITS)}, got {init!r}")


@dataclass
class MultiRankConfig:
    """What to adapt and how. `rank_pattern` ({fully qualified module name: ranks}) overrides `ranks` per layer,
    as budget-fitted ladders do; `lora_alpha=None` means 2 x the layer's largest rank (rankwise's alpha_factor 2),
    so with `scaling="max"` every branch starts at LoRA's usual scale 2."""

    ranks: list[int] = field(default_factory=lambda: [32, 16, 8, 4, 2])
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = "all-linear"
    modules_to_save: list[str] | None = None
    coefficient_init: str = "ones"
    scaling: str = "max"
    rank_pattern: dict[str, list[int]] = field(default_factory=dict)
    fan_in_fan_out: bool = False  # recorded on save (GPT-2 Conv1D targets); layers detect it themselves
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        self.ranks = parse_ranks(self.ranks)
        self.rank_pattern = {k: parse_ranks(v) for k, v in (self.rank_pattern or {}).items()}
        if self.coefficient_init not in COEFFICIENT_INITS:
            raise RankwiseError(f"coefficient_init must be one of {', '.join(COEFFICIENT_INITS)}, "
                                f"got {self.coefficient_init!r}")
        if self.scaling not in SCALINGS:
            raise RankwiseError(f"scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise RankwiseError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise RankwiseError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")

    def ranks_for(self, name: str) -> list[int]:
        return list(self.rank_pattern.get(name, self.ranks))

    def alpha_for(self, ranks: Sequence[int]) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * max(ranks)

    # ----- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        from ...version import __version__

        return {"format": FORMAT, "schema": SCHEMA, "rankwise_version": __version__, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "MultiRankConfig":
        if d.get("format") != FORMAT:
            raise RankwiseError(f"{where} is not a rankwise multi-rank config (format {d.get('format')!r})")
        if int(d.get("schema", 0)) > SCHEMA:
            raise RankwiseError(f"{where} has multi-rank schema {d['schema']} (written by rankwise "
                                f"{d.get('rankwise_version')}); this rankwise reads schema <= {SCHEMA}: upgrade rankwise")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / CONFIG_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "MultiRankConfig":
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise RankwiseError(f"{folder} has no {CONFIG_NAME}: not a multi-rank adapter folder")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RankwiseError(f"{path} is corrupt ({e})") from None
        return cls.from_dict(d, str(path))
