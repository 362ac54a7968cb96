"""Shared by train and eval: resolve the model, read and encode the data, and build a Trainer.

train() decides the DataInfo from the training data; eval reuses the run's saved DataInfo so labels map the same way.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..types import RankwiseError
from .data import DataInfo, detect_columns, label_info, load_splits, subsample
from .tasks import (
    TruncationNotice,
    collator,
    encode_classification,
    encode_instructions,
    encode_text_blocks,
    max_length_for,
)

__all__ = ["Prepared", "resolve_model_path", "pick_device", "read_data", "add_labels", "encode",
           "default_max_length", "make_trainer", "quiet_trainer", "clean_metrics", "quiet_libraries", "say"]

_DEFAULT_MAX_LENGTH = 512  # the model's own limit may be 8k+: packing blocks that long is rarely wanted on CPU


@dataclass
class Prepared:
    splits: dict
    info: DataInfo


def resolve_model_path(model: str | os.PathLike) -> str:
    """Alias -> folder; an existing folder -> itself; a path-looking string that does not exist -> an error."""
    from ..assets import MODEL_ALIASES, resolve_model

    s = str(model)
    if Path(s).exists():
        if not (Path(s) / "config.json").is_file():
            raise RankwiseError(f"model folder {s} has no config.json (not a transformers model)")
        return s
    if s in MODEL_ALIASES:
        return resolve_model(s)
    if s.startswith(("/", ".", "~")) or s.count("/") != 1:
        raise RankwiseError(f"model path {s} does not exist; give a model folder, an alias "
                            f"({', '.join(MODEL_ALIASES)}), or a hub id owner/name (online)")
    return s  # a hub id: loading says whether it can be reached


def pick_device(device: str) -> str:
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise RankwiseError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RankwiseError("--device cuda but no CUDA GPU is visible; use --device cpu")
    return device


def read_data(data, *, info: DataInfo | None = None, text_columns: Sequence[str] | None = None,
              label_column: str | None = None, validation_split: float = 0.1, seed: int = 0) -> Prepared:
    """Load splits and decide (or reuse) what the columns mean."""
    splits, kind = load_splits(data, validation_split=validation_split, seed=seed)
    if info is not None:  # evaluating a run: the columns must be the ones it was trained on
        cols = splits["validation"].column_names
        missing = [c for c in info.text_columns + ([info.label_column] if info.label_column else []) if c not in cols]
        if missing:
            raise RankwiseError(f"the data lacks column(s) {missing} that the run was trained on; it has {cols}")
        return Prepared(splits, info)
    if kind == "text":
        return Prepared(splits, DataInfo(source=str(data), kind="text", text_columns=["text"]))
    kind, texts, label = detect_columns(splits["train"].column_names, text_columns, label_column)
    info = DataInfo(source=str(data), kind=kind, text_columns=texts, label_column=label)
    return Prepared(splits, info)


def add_labels(prepared: Prepared) -> None:
    """Fill in label type, class count and label map (only for seq-cls; causal LM has no labels)."""
    li = label_info(prepared.splits, prepared.info.label_column)
    prepared.info.label_type = li["label_type"]
    prepared.info.num_labels = li["num_labels"]
    prepared.info.id2label = li["id2label"]
    prepared.info.label2id = li.get("label2id")


def default_max_length(tokenizer, config, max_length: int | None) -> int:
    if max_length is not None and max_length < 8:
        raise RankwiseError(f"--max-length must be >= 8, got {max_length}")
    return max_length_for(tokenizer, config, max_length, default=_DEFAULT_MAX_LENGTH)


def encode(ds, task: str, info: DataInfo, tokenizer, max_length: int, n: int | None, seed: int,
           notice: TruncationNotice | None = None):
    """Subsample (seeded) then tokenize one split for the task. Plain text keeps its first `n` lines instead:
    shuffled lines packed into blocks would no longer be prose."""
    if info.kind == "text":
        ds = ds.select(range(min(n, len(ds)))) if n else ds
    else:
        ds = subsample(ds, n, seed)
    if task == "seq-cls":
        return encode_classification(ds, tokenizer, info, max_length, notice)
    if info.kind == "instruction":
        return encode_instructions(ds, tokenizer, max_length, notice)
    if info.kind == "text" or len(info.text_columns) == 1:
        return encode_text_blocks(ds, tokenizer, max_length, column=info.text_columns[0])
    raise RankwiseError(f"causal-lm needs Alpaca columns (instruction, input, output) or one text column; "
                        f"got {info.text_columns}; pick one with --text-columns")


def make_trainer(model, tokenizer, task: str, label_type: str | None, *, out_dir: str, train_ds=None,
                 eval_ds=None, lr: float = 2e-3, epochs: float = 1.0, batch_size: int = 16,
                 max_steps: int | None = None, seed: int = 0, device: str = "cpu", progress: bool = True,
                 logging_steps: int = 10, eval_batch_size: int | None = None):
    """A Trainer that saves nothing by itself (the run is saved once, atomically, by the caller)."""
    from transformers import Trainer, TrainingArguments

    from .metrics import metrics_fn

    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size or batch_size * 2,  # no gradients: twice the batch fits
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps else -1,
        learning_rate=lr,
        warmup_steps=0.06,  # a ratio: a short warmup keeps the fresh LoRA/head from a bad first step
        lr_scheduler_type="linear",
        logging_steps=logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=device == "cpu",
        disable_tqdm=not progress,
        remove_unused_columns=False,  # columns are already exactly the model's inputs
        label_names=["labels"],  # peft wrappers hide forward()'s signature from the Trainer's guess
        prediction_loss_only=task == "causal-lm",  # perplexity needs the loss only, not vocab-sized logits
        dataloader_pin_memory=device == "cuda",
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        data_collator=collator(task, tokenizer),
        compute_metrics=None if task == "causal-lm" else metrics_fn(label_type or "class"),
    )
    if not progress:
        quiet_trainer(trainer)
    return trainer


def quiet_trainer(trainer) -> None:
    """Without progress bars the Trainer prints every log dict instead; drop that printer too."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def clean_metrics(metrics: dict, prefix: str = "eval_") -> dict:
    """Trainer metrics minus timing noise (runtime, samples/s) that would make results differ run to run."""
    drop = ("runtime", "samples_per_second", "steps_per_second", "epoch", "preparation_time")
    return {k: float(v) for k, v in metrics.items() if not any(k.endswith(d) for d in drop)}


@contextmanager
def quiet_libraries(progress: bool):
    """With progress off, also silence datasets' map bars and transformers' load reports; restore afterwards."""
    if progress:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars, hf_bars = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()


def say(msg: str, progress: bool = True) -> None:
    if progress:
        print(msg, file=sys.stderr)
