"""APPLY: a Plan is the decided rank/alpha per layer; it becomes a peft LoraConfig and is verified on the model.

`plan.json` is an interface others depend on (train, sweeps, later tuners): fields are only ever added.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .allocators import allocate, parse_budget
from .targets import ALL_LINEAR, peft_patterns
from .types import Budget, LayerStats, RankwiseError

__all__ = ["PLAN_SCHEMA", "PlanRow", "Plan", "make_plan", "count_params"]

PLAN_SCHEMA = 1
# Metrics copied into plan rows (the rest stay in `rankwise analyze` output).
_ROW_METRICS = ("alpha_hill", "alpha", "num_spikes", "stable_rank", "spectral_norm", "frobenius_norm")


@dataclass
class PlanRow:
    name: str  # fully qualified module name in the model the plan was made on
    shape: list[int]  # [out, in]
    rank: int  # 0 = not adapted
    alpha: float
    params: int  # rank * (in + out)
    kind: str = "linear"
    module_type: str = "other"
    depth: int | None = None
    score: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Plan:
    strategy: str
    budget: Budget
    spent: int
    layers: list[PlanRow]
    tolerance: int = 0
    hparams: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    targets: Any = ALL_LINEAR
    min_rank: int = 1
    max_rank: int | None = None
    rank_step: int = 1
    alpha_factor: float = 2.0
    schema: int = PLAN_SCHEMA

    # ----- views -------------------------------------------------------------------------------------------
    @property
    def adapted(self) -> list[PlanRow]:
        return [row for row in self.layers if row.rank > 0]

    @property
    def ranks(self) -> dict[str, int]:
        return {row.name: row.rank for row in self.adapted}

    @property
    def alphas(self) -> dict[str, float]:
        return {row.name: row.alpha for row in self.adapted}

    # ----- peft --------------------------------------------------------------------------------------------
    def to_lora_config(self, *, lora_alpha: float | None = None, name_map: dict[str, str] | None = None, **lora_kwargs):
        """A peft LoraConfig adapting exactly the plan's layers with the plan's ranks and alphas.

        `target_modules` lists fully qualified names (peft matches a list by name or "."-suffix, literally);
        `rank_pattern`/`alpha_pattern` keys go through `targets.pattern_key` (regex-escaped, fully qualified).
        `lora_alpha` overrides every layer's alpha; `name_map` renames plan layers to another model's names.
        Other keyword arguments (lora_dropout, use_dora, use_rslora, modules_to_save, task_type...) pass through.
        """
        from peft import LoraConfig

        rows = self.adapted
        if not rows:
            raise RankwiseError("the plan adapts no layer (every rank is 0)")
        rename = name_map or {}
        ranks = {rename.get(r.name, r.name): r.rank for r in rows}
        alphas = {rename.get(r.name, r.name): float(lora_alpha if lora_alpha is not None else r.alpha) for r in rows}
        r0 = Counter(ranks.values()).most_common(1)[0][0]
        a0 = Counter(alphas.values()).most_common(1)[0][0]
        kwargs = dict(lora_kwargs)
        if any(r.kind == "conv1d" for r in rows):
            kwargs.setdefault("fan_in_fan_out", True)  # GPT-2 Conv1D stores weights transposed
        if self.model and "base_model_name_or_path" not in kwargs:
            kwargs["base_model_name_or_path"] = self.model
        return LoraConfig(
            r=r0,
            lora_alpha=a0,
            target_modules=list(ranks),
            rank_pattern=peft_patterns(ranks),
            alpha_pattern=peft_patterns(alphas),
            **kwargs,
        )

    # ----- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["budget"] = self.budget.to_dict()
        return {"schema": d.pop("schema"), **d}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if int(d.get("schema", 1)) > PLAN_SCHEMA:
            raise RankwiseError(f"plan schema {d['schema']} is newer than this rankwise ({PLAN_SCHEMA}); upgrade")
        d = dict(d)
        b = d.pop("budget")
        rows = [PlanRow(**row) for row in d.pop("layers")]
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(budget=Budget(int(b["params"]), b.get("spec", "")), layers=rows, **known)

    def save(self, out_dir: str | os.PathLike, **lora_kwargs) -> Path:
        """Write `plan.json` and a peft `adapter_config.json` (loads with `LoraConfig.from_pretrained(out_dir)`)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.to_lora_config(**lora_kwargs).save_pretrained(str(out))
        self.write_json(out / "plan.json")
        return out

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write plan.json alone (atomically), e.g. beside an adapter whose config peft already wrote."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Load from a plan directory (containing plan.json) or a plan.json file."""
        p = Path(path)
        if p.is_dir():
            p = p / "plan.json"
        if not p.is_file():
            raise RankwiseError(f"no plan at {path}: expected a directory with plan.json (from `rankwise plan`)")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise RankwiseError(f"{p} is not a valid rankwise plan: {e}") from None

    def format_table(self) -> str:
        lines = [f"{'layer':<52} {'shape':>11} {'type':>9} {'score':>7} {'rank':>5} {'alpha':>6} {'params':>9}"]
        for r in self.layers:
            score = "" if r.score is None else f"{r.score:.3f}"
            shape = "x".join(map(str, r.shape))
            lines.append(
                f"{r.name:<52} {shape:>11} {r.module_type:>9} {score:>7} {r.rank:>5} {r.alpha:>6g} {r.params:>9,}"
            )
        lines.append(
            f"strategy={self.strategy} budget={self.budget.params:,} ({self.budget.spec}) spent={self.spent:,} "
            f"({self.spent / self.budget.params:.2%}) layers adapted={len(self.adapted)}/{len(self.layers)}"
        )
        return "\n".join(lines)


def count_params(source: nn.Module | str | os.PathLike) -> int:
    """Total parameters of a model; for a safetensors folder read from the headers, without loading weights."""
    if isinstance(source, nn.Module):
        return sum(p.numel() for p in source.parameters())
    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    if not files:  # a .bin folder or a hub id: build the model to count it
        from .stats.sources import load_model

        return sum(p.numel() for p in load_model(source).parameters())
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def _rows(stats: Sequence[LayerStats], ranks, alphas, scores) -> list[PlanRow]:
    rows = []
    for s in stats:
        r = int(ranks.get(s.name, 0))
        rows.append(
            PlanRow(
                name=s.name,
                shape=list(s.info.shape),
                rank=r,
                alpha=float(alphas[s.name]) if r else 0.0,
                params=r * s.info.params_per_rank,
                kind=s.info.kind,
                module_type=s.info.module_type,
                depth=s.info.depth,
                score=None if scores is None else float(scores[s.name]),
                metrics={k: float(s.metrics[k]) for k in _ROW_METRICS if k in s.metrics},
            )
        )
    return rows


def make_plan(
    model: nn.Module | str | os.PathLike,
    strategy: str,
    budget: int | str | Budget | None = None,
    *,
    budget_rank: int | None = None,
    targets: str | Sequence[str] | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    rank_step: int = 1,
    alpha_factor: float = 2.0,
    stats: Sequence[LayerStats] | None = None,
    model_name: str | None = None,
    progress: bool = True,
    **hparams,
) -> Plan:
    """Measure (unless `stats` is given), allocate `budget` with `strategy`, and return the Plan.

    `budget` is trainable LoRA parameters: 300000, "300k", "1.2M", "0.5%" (of model parameters); or give
    `budget_rank=8` for what uniform rank 8 costs on the same targets.
    """
    if isinstance(model, (str, os.PathLike)):
        from .assets import resolve_model

        model = resolve_model(model)
    if stats is None:
        from .stats import analyze

        stats = analyze(model, targets, progress=progress)
    layers = [s.info for s in stats]
    total = count_params(model) if isinstance(budget, str) and budget.strip().endswith("%") else None
    b = parse_budget(budget, layers, total_params=total, budget_rank=budget_rank)
    if not alpha_factor > 0:
        raise RankwiseError(f"alpha_factor must be > 0, got {alpha_factor!r}")
    alloc = allocate(strategy, stats, b, min_rank=min_rank, max_rank=max_rank, rank_step=rank_step, **hparams)
    ranks = alloc.pattern.ranks
    alphas = alloc.pattern.alphas or {n: alpha_factor * r for n, r in ranks.items()}
    if model_name is None and not isinstance(model, nn.Module):
        model_name = str(model)
    if model_name is None and isinstance(model, nn.Module):
        model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return Plan(
        strategy=strategy,
        budget=b,
        spent=alloc.spent,
        layers=_rows(stats, ranks, alphas, alloc.pattern.scores),
        tolerance=alloc.tolerance,
        hparams=alloc.hparams,
        model=model_name,
        targets=ALL_LINEAR if targets is None else (targets if isinstance(targets, str) else list(targets)),
        min_rank=min_rank,
        max_rank=max_rank,
        rank_step=rank_step,
        alpha_factor=alpha_factor,
    )
