"""Rank discovery: what each branch contributes per layer, and the effective rank of each layer's delta.

Everything here works on a saved adapter (config + tensors), so a finished run folder can be read without the
base model: contribution_i = |s_i c_i| * ||B_i A_i||_F, and the effective rank at energy e is the fewest singular
values of delta_W = sum_i s_i c_i B_i A_i whose squares keep a share e of the total.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import torch

from ...types import RankwiseError
from .config import CONFIG_NAME, WEIGHTS_NAME, MultiRankConfig, branch_scales

__all__ = ["DEFAULT_ENERGY", "TABLE_NAME", "read_adapter", "layer_deltas", "effective_rank", "layer_rows",
           "write_table", "read_table"]

DEFAULT_ENERGY = 0.9
TABLE_NAME = "multirank_ranks"  # .json, .csv and .png in the run folder


def read_adapter(folder: str | os.PathLike) -> tuple[MultiRankConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = MultiRankConfig.from_pretrained(folder)
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise RankwiseError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; re-run `rankwise train`")
    return config, load_file(str(weights))


def _branches(config: MultiRankConfig, tensors: dict, name: str):
    """[(rank, scale, coefficient, A_i (r, in), B_i (out, r))] of one layer, in float64."""
    ranks = config.ranks_for(name)
    a = tensors[f"{name}.multirank_A"].double()
    b = tensors[f"{name}.multirank_B"].double()
    coef = tensors[f"{name}.multirank_coefficients"].double()
    scales = branch_scales(ranks, config.alpha_for(ranks), config.scaling)
    out, start = [], 0
    for i, r in enumerate(ranks):
        out.append((r, scales[i], float(coef[i]), a[start:start + r], b[:, start:start + r]))
        start += r
    return out


def _fold(config: MultiRankConfig, tensors: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = tensors[f"{name}.multirank_A"]
    parts = [bi * (s * c) for _, s, c, _, bi in _branches(config, tensors, name)]
    return a, torch.cat(parts, dim=1).to(a.dtype)


def layer_deltas(config: MultiRankConfig, tensors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A (sum r, in), B (out, sum r) with s_i c_i folded into branch i's columns)}: B @ A = delta_W."""
    return {name: _fold(config, tensors, name) for name in config.rank_pattern}


def effective_rank(delta: torch.Tensor, energy: float) -> int:
    """The fewest singular values keeping `energy` of sum sigma^2 (0 for an all-zero delta)."""
    s = torch.linalg.svdvals(delta.double())
    total = float((s ** 2).sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(s ** 2, 0) / total
    return int((cum < energy - 1e-12).sum()) + 1


def layer_rows(config: MultiRankConfig, tensors: dict, energy: float = DEFAULT_ENERGY) -> list[dict]:
    """One row per adapted layer: branch ranks, coefficients, contributions and shares, effective ranks."""
    if not 0 < energy <= 1:
        raise RankwiseError(f"energy must be in (0, 1], got {energy}")
    rows = []
    for name in config.rank_pattern:
        branches = _branches(config, tensors, name)
        contrib = [abs(s * c) * float(torch.linalg.norm(bi @ ai)) for _, s, c, ai, bi in branches]
        if not all(math.isfinite(v) for v in contrib):
            raise RankwiseError(f"layer {name} has non-finite multi-rank weights: training diverged "
                                "(lower --lr or use --set coefficient_init=ones)")
        a, b = _fold(config, tensors, name)
        delta = b.double() @ a.double()
        total = sum(contrib)
        rows.append({
            "name": name, "shape": [int(b.shape[0]), int(a.shape[1])], "ranks": [r for r, *_ in branches],
            "coefficients": [c for _, _, c, _, _ in branches], "scales": [s for _, s, _, _, _ in branches],
            "contributions": contrib, "shares": [v / total if total > 0 else 0.0 for v in contrib],
            "dominant_rank": branches[max(range(len(contrib)), key=contrib.__getitem__)][0] if total > 0 else 0,
            "effective_rank": effective_rank(delta, energy), "effective_rank_99": effective_rank(delta, 0.99),
            "delta_norm": float(torch.linalg.norm(delta)), "energy": energy,
        })
    return rows


def write_table(rows: list[dict], folder: Path) -> list[Path]:
    """multirank_ranks.json (all fields) and multirank_ranks.csv (one line per layer and branch)."""
    js = folder / f"{TABLE_NAME}.json"
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps({"layers": rows}, indent=2) + "\n")
    tmp.replace(js)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", "rank", "coefficient", "scale", "contribution", "share", "effective_rank", "energy"])
    for row in rows:
        for i, r in enumerate(row["ranks"]):
            w.writerow([row["name"], r, f"{row['coefficients'][i]:.6g}", f"{row['scales'][i]:.6g}",
                        f"{row['contributions'][i]:.6g}", f"{row['shares'][i]:.4f}", row["effective_rank"],
                        row["energy"]])
    (folder / f"{TABLE_NAME}.csv").write_text(buf.getvalue())
    return [js, folder / f"{TABLE_NAME}.csv"]


def read_table(folder: str | os.PathLike) -> list[dict] | None:
    p = Path(folder) / f"{TABLE_NAME}.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())["layers"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RankwiseError(f"{p} is corrupt ({e}); delete it to recompute from the adapter") from None
