"""APPLY: a Plan is the decided rank/alpha per layer; it becomes a peft LoraConfig and is verified on the model.

`plan.json` is an interface others depend on (train, sweeps, later tuners): fields are only ever added.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .allocators import allocate, parse_budget
from .targets import ALL_LINEAR, peft_patterns
from .types import Budget, LayerStats, RankwiseError

__all__ = ["PLAN_SCHEMA", "PlanRow", "Plan", "make_plan", "count_params", "model_fingerprint"]

PLAN_SCHEMA = 1
# Metrics copied into plan rows (the rest stay in `rankwise analyze` output).
_ROW_METRICS = ("alpha_hill", "alpha", "num_spikes", "stable_rank", "spectral_norm", "frobenius_norm",
                "act_in_norm2", "act_out_norm2", "act_effective_rank", "act_explained_topk", "grad_norm",
                "grad_sensitivity", "grad_stable_rank")  # the last seven: data statistics (plan --data)


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
    calibration: dict | None = None  # data, samples, seed and per-layer spectra when measured on data (--data)
    schema: int = PLAN_SCHEMA
    # what the plan was made on: {"model_type", "architectures", "target_layers", "digest"} (see model_fingerprint)
    fingerprint: dict | None = None

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
        """A Plan from plan.json contents, checked field by field (a hand-edited file is not taken on trust):
        ranks are non-negative integers, alphas finite and positive, shapes two positive integers. Each row's
        `params` and the plan's `spent` are recomputed from ranks and shapes, never copied from the file."""
        if not isinstance(d, dict):
            raise RankwiseError(f"plan.json must hold a JSON object, got {type(d).__name__}")
        schema = d.get("schema", 1)
        if isinstance(schema, bool) or not isinstance(schema, int):
            raise RankwiseError(f"plan schema must be an integer, got {schema!r}")
        if schema > PLAN_SCHEMA:
            raise RankwiseError(f"plan schema {schema} is newer than this rankwise ({PLAN_SCHEMA}); upgrade")
        d = dict(d)
        b = d.pop("budget", None)
        if not isinstance(b, dict) or isinstance(b.get("params"), bool) or not isinstance(b.get("params"), int):
            raise RankwiseError(f"plan budget must be {{\"params\": N, ...}} with an integer N, got {b!r}")
        layers = d.pop("layers", None)
        if not isinstance(layers, list) or not layers:
            raise RankwiseError("plan has no \"layers\" list")
        rows = [_check_row(i, row) for i, row in enumerate(layers)]
        dup = sorted({r.name for r in rows if sum(x.name == r.name for x in rows) > 1})
        if dup:
            raise RankwiseError(f"plan lists layer {dup[0]!r} more than once")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["spent"] = sum(r.params for r in rows)  # recomputed: a hand edit of "spent" changes nothing
        return cls(budget=Budget(b["params"], str(b.get("spec", ""))), layers=rows, **known)

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
        except RankwiseError as e:
            raise RankwiseError(f"{p} is not a valid rankwise plan: {e}") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise RankwiseError(f"{p} is not a valid rankwise plan: {str(e).splitlines()[0][:200]}") from None

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
        if self.calibration:
            c = self.calibration
            lines.append(f"calibration: {c.get('examples')} examples of the {c.get('split', 'train')} split of "
                         f"{c.get('data')} (seed {c.get('seed')}), {c.get('tokens')} tokens, {c.get('seconds')} s")
        return "\n".join(lines)


def _check_row(i: int, row) -> PlanRow:
    """One plan.json layer row, checked; `params` recomputed from rank and shape."""
    import math

    if not isinstance(row, dict):
        raise RankwiseError(f"layer {i} is not an object: {row!r}")
    name = row.get("name")
    if not isinstance(name, str) or not name:
        raise RankwiseError(f"layer {i} has no name")
    shape, rank, alpha = row.get("shape"), row.get("rank"), row.get("alpha", 0.0)
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape)):
        raise RankwiseError(f"layer {name}: shape must be [out, in] positive integers, got {shape!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise RankwiseError(f"layer {name}: rank must be a non-negative integer, got {rank!r}")
    if rank > min(shape):
        raise RankwiseError(f"layer {name}: rank {rank} exceeds min(out, in) = {min(shape)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise RankwiseError(f"layer {name}: alpha must be a finite number, got {alpha!r}")
    if rank > 0 and alpha <= 0:
        raise RankwiseError(f"layer {name}: alpha must be > 0 for an adapted layer, got {alpha!r}")
    fields = {k: v for k, v in row.items() if k in PlanRow.__dataclass_fields__}  # newer files may add keys
    fields.update(shape=list(shape), rank=rank, alpha=float(alpha), params=rank * (shape[0] + shape[1]))
    return PlanRow(**fields)


def model_fingerprint(model, stats: Sequence[LayerStats]) -> dict:
    """What a plan was made on: the architecture (config model_type and architectures, when known) and a digest
    of every target layer's name and shape, so a plan applied to another model can be told apart."""
    import hashlib

    config = _config_of(model)
    lines = "\n".join(f"{s.name}:{s.info.out_features}x{s.info.in_features}" for s in stats)
    return {"model_type": config.get("model_type"), "architectures": config.get("architectures"),
            "target_layers": len(stats), "digest": hashlib.sha256(lines.encode()).hexdigest()[:16]}


def _config_of(model) -> dict:
    if isinstance(model, nn.Module):
        cfg = getattr(model, "config", None)
        return {"model_type": getattr(cfg, "model_type", None), "architectures": getattr(cfg, "architectures", None)}
    p = Path(str(model))
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    try:
        data = json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, ValueError):
        data = {}
    return {"model_type": data.get("model_type"), "architectures": data.get("architectures")}


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
    calibration=None,
    **hparams,
) -> Plan:
    """Measure (unless `stats` is given), allocate `budget` with `strategy`, and return the Plan.

    `budget` is trainable LoRA parameters: 300000, "300k", "1.2M", "0.5%" (of model parameters); or give
    `budget_rank=8` for what uniform rank 8 costs on the same targets. `calibration` (a
    `rankwise.stats.calibration.Calibration` over training examples) adds data statistics to `stats`; the
    data-driven strategies (activation, gradient, eva) need it.
    """
    from .allocators import check_strategy

    check_strategy(strategy, hparams)  # an unknown strategy or a bad option fails before the model is measured
    from .parsing import check_number

    check_number("alpha_factor", alpha_factor, lo=0, lo_open=True, allow_none=False)
    if isinstance(model, (str, os.PathLike)):
        from .assets import resolve_model

        model = resolve_model(model)
    if stats is None and calibration is None:
        _data_stats(model, strategy, (), None, progress)  # a data-driven strategy fails before measuring
    if stats is None:
        from .stats import analyze

        stats = analyze(model, targets, progress=progress)
    stats, cal_record = _data_stats(model, strategy, stats, calibration, progress)
    layers = [s.info for s in stats]
    total = count_params(model) if isinstance(budget, str) and budget.strip().endswith("%") else None
    b = parse_budget(budget, layers, total_params=total, budget_rank=budget_rank)
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
        calibration=cal_record,
        fingerprint=model_fingerprint(model, stats),
    )


def _data_stats(model, strategy: str, stats, calibration, progress: bool):
    """Stats plus data metrics measured on `calibration`; without one, a data-driven strategy is an error."""
    from .allocators import get_allocator

    needs = get_allocator(strategy).needs
    if calibration is None:
        missing = not stats or any(m not in s.metrics for s in stats for m in needs)
        if missing and any(m.startswith(("act_", "grad_")) for m in needs):
            raise RankwiseError(f"strategy {strategy!r} allocates from data statistics: give --data D (a calibration "
                                "sample of its training split is measured)")
        return stats, None
    from .stats.calibration import calibrate, with_data_metrics

    act, grad = (any(m.startswith(p) for m in needs) for p in ("act_", "grad_"))
    if act or grad:  # measure only what the strategy reads: gradients cost a backward pass, activations a Gram
        calibration = replace(calibration, activations=calibration.activations and act,
                              gradients=calibration.gradients and grad)
    cal_model = calibration.model if calibration.model is not None else model
    if not isinstance(cal_model, nn.Module):
        raise RankwiseError("calibration needs the model with its task head (Calibration.model)")
    result = calibrate(cal_model, calibration, [s.info for s in stats], progress=progress)
    return with_data_metrics(stats, result), result.record(calibration)
