"""Trainer habits as rankwise flags: accumulation, warm-up, decay, scheduler, mixed precision, checkpoints,
evaluation during training, experiment trackers, and `--train-arg KEY=VALUE` for any other TrainingArguments field.

Everything is checked here, before a model loads, so a typo costs a second and not a tokenized data set.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field

from ..types import RankwiseError

__all__ = ["TrainOptions", "SCHEDULERS", "REPORTERS", "FLAG_FIELDS", "parse_train_args", "process_rank",
           "world_size", "is_main_process"]

# Schedulers that need no extra arguments (the others take lr_scheduler_kwargs: pass them with --train-arg).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
REPORTERS = ("none", "tensorboard", "wandb", "mlflow")
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb", "mlflow": "pip install mlflow"}
# TrainingArguments fields that a rankwise flag sets: --train-arg names the flag instead of silently fighting it.
FLAG_FIELDS = {
    "learning_rate": "--lr", "num_train_epochs": "--epochs", "per_device_train_batch_size": "--batch-size",
    "max_steps": "--max-steps", "seed": "--seed", "data_seed": "--seed", "gradient_accumulation_steps":
    "--grad-accum", "warmup_steps": "--warmup-ratio", "warmup_ratio": "--warmup-ratio", "weight_decay":
    "--weight-decay", "lr_scheduler_type": "--scheduler", "bf16": "--bf16", "fp16": "--fp16", "save_steps":
    "--save-steps", "save_strategy": "--save-steps", "save_total_limit": "--save-total-limit", "eval_steps":
    "--eval-steps", "eval_strategy": "--eval-steps", "report_to": "--report-to", "use_cpu": "--device",
    "disable_tqdm": "-q", "resume_from_checkpoint": "--resume", "output_dir": "--out",
}
# Fields rankwise needs as it sets them (the run folder's layout and the model's inputs depend on them).
_FIXED = ("remove_unused_columns", "label_names", "prediction_loss_only", "logging_dir", "overwrite_output_dir")


@dataclass
class TrainOptions:
    grad_accum: int = 1
    warmup_ratio: float = 0.06  # a short warm-up keeps the fresh LoRA/head from a bad first step
    weight_decay: float = 0.0
    scheduler: str = "linear"
    bf16: bool = False
    fp16: bool = False
    save_steps: int | None = None
    save_total_limit: int | None = None
    eval_steps: int | None = None
    report_to: list[str] = field(default_factory=list)
    train_args: dict = field(default_factory=dict)

    def check(self, device: str | None = None) -> "TrainOptions":
        """Range- and type-check every option (one-line errors); `device` as picked (cpu, cuda, cuda:N)."""
        _int_at_least("--grad-accum", self.grad_accum, 1)
        _finite("--warmup-ratio", self.warmup_ratio)
        if not 0 <= self.warmup_ratio < 1:
            raise RankwiseError(f"--warmup-ratio must be in [0, 1) (a share of the steps), got {self.warmup_ratio}")
        _finite("--weight-decay", self.weight_decay)
        if self.weight_decay < 0:
            raise RankwiseError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.scheduler not in SCHEDULERS:
            raise RankwiseError(f"unknown --scheduler {self.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
        if self.bf16 and self.fp16:
            raise RankwiseError("give one of --bf16 and --fp16, not both")
        if self.fp16 and device is not None and not device.startswith("cuda"):
            raise RankwiseError("--fp16 needs a CUDA GPU; on CPU use --bf16 (or full precision)")
        for flag, v in (("--save-steps", self.save_steps), ("--save-total-limit", self.save_total_limit),
                        ("--eval-steps", self.eval_steps)):
            if v is not None:
                _int_at_least(flag, v, 1)
        if self.save_total_limit is not None and self.save_steps is None:
            raise RankwiseError("--save-total-limit needs --save-steps (no checkpoints are kept without it)")
        self.report_to = _check_reporters(self.report_to)
        self.train_args = parse_train_args(self.train_args)
        return self

    def to_dict(self) -> dict:
        return {"grad_accum": self.grad_accum, "warmup_ratio": self.warmup_ratio, "weight_decay": self.weight_decay,
                "scheduler": self.scheduler, "bf16": self.bf16, "fp16": self.fp16, "save_steps": self.save_steps,
                "save_total_limit": self.save_total_limit, "eval_steps": self.eval_steps,
                "report_to": list(self.report_to), "train_args": dict(self.train_args)}

    def trainer_kwargs(self) -> dict:
        """TrainingArguments keywords; --train-arg fields come last and win where rankwise has no flag."""
        kw = {
            "gradient_accumulation_steps": self.grad_accum,
            "warmup_steps": self.warmup_ratio,  # transformers 5: a float < 1 is a share of the total steps
            "weight_decay": self.weight_decay,
            "lr_scheduler_type": self.scheduler,
            "bf16": self.bf16,
            "fp16": self.fp16,
            "save_strategy": "steps" if self.save_steps else "no",
            "eval_strategy": "steps" if self.eval_steps else "no",
            "report_to": list(self.report_to) or "none",
        }
        if self.save_steps:
            kw["save_steps"] = self.save_steps
            kw["save_total_limit"] = self.save_total_limit
        if self.eval_steps:
            kw["eval_steps"] = self.eval_steps
        return {**kw, **self.train_args}


def _int_at_least(flag: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise RankwiseError(f"{flag} must be an integer >= {low}, got {v!r}")


def _finite(flag: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RankwiseError(f"{flag} must be a finite number, got {v!r}")


def _check_reporters(names) -> list[str]:
    """--report-to tensorboard,wandb: each a Trainer integration whose package is installed; none means none."""
    from transformers.integrations import integration_utils as iu

    if isinstance(names, str):
        names = [names]
    items = [n.strip() for raw in names or () for n in str(raw).split(",") if n.strip()]
    unknown = [n for n in items if n not in REPORTERS]
    if unknown:
        raise RankwiseError(f"unknown --report-to {unknown[0]!r}; use {', '.join(REPORTERS)} (comma-separated)")
    if "none" in items:
        if len(items) > 1:
            raise RankwiseError("--report-to none cannot be combined with a tracker")
        return []
    available = {"tensorboard": iu.is_tensorboard_available, "wandb": iu.is_wandb_available,
                 "mlflow": iu.is_mlflow_available}
    for n in items:
        if not available[n]():
            raise RankwiseError(f"--report-to {n} needs the {n} package, which is not installed: {_INSTALL[n]}")
    return list(dict.fromkeys(items))


# ----- --train-arg KEY=VALUE ----------------------------------------------------------------------------------
def _fields() -> dict:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def _accepts(tp, value) -> bool:
    """Does `value` (parsed from JSON) fit a TrainingArguments annotation? Unknown annotations say yes and leave
    the judgement to TrainingArguments itself."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if tp in (list, tuple) or origin in (list, tuple):
        return isinstance(value, list)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, str) and value in {m.value for m in tp}
    return not isinstance(tp, type)  # an unusual class (e.g. a config object): not settable from a string


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def parse_train_args(pairs) -> dict:
    """`KEY=VALUE` strings (or an already-parsed dict) -> TrainingArguments keywords, each checked: a real
    field, not one a rankwise flag owns, and a value of the field's type (read as JSON when it parses)."""
    if isinstance(pairs, dict):
        items = list(pairs.items())
    else:
        items = []
        for pair in pairs or ():
            key, sep, raw = str(pair).partition("=")
            if not sep or not key.strip():
                raise RankwiseError(f"--train-arg expects KEY=VALUE (a TrainingArguments field), got {pair!r}")
            items.append((key.strip(), raw))
    fields, out = _fields(), {}
    for key, raw in items:
        if key in FLAG_FIELDS:
            raise RankwiseError(f"--train-arg {key}: set it with {FLAG_FIELDS[key]} instead")
        if key in _FIXED:
            raise RankwiseError(f"--train-arg {key}: rankwise sets this field itself (the run folder depends on it)")
        if key not in fields:
            raise RankwiseError(f"--train-arg {key}: not a TrainingArguments field of transformers "
                                f"(e.g. max_grad_norm, optim, gradient_checkpointing, label_smoothing_factor)")
        out[key] = _value(key, raw, fields[key].type)
    return out


def _value(key: str, raw, tp):
    if not isinstance(raw, str):  # from a --config file: already typed
        if _accepts(tp, raw):
            return raw
        raise RankwiseError(f"--train-arg {key}={raw!r}: expected {_type_name(tp)}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if _accepts(tp, value):
        return value
    if _accepts(tp, raw):  # "123" for a string field stays a string
        return raw
    raise RankwiseError(f"--train-arg {key}={raw}: expected {_type_name(tp)}")


# ----- data-parallel launches (torchrun, accelerate launch) ------------------------------------------------------
def process_rank() -> int:
    """This process's global rank under torchrun/accelerate launch (both set RANK); 0 when run alone."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def is_main_process() -> bool:
    return process_rank() == 0
