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
from .columns import ROW_COLUMN, decide_columns, describe_decision, drop_or_refuse_empty
from .data import DataInfo, label_info, load_splits, subsample
from .tasks import (
    TruncationNotice,
    collator,
    encode_classification,
    encode_instructions,
    encode_text_blocks,
    max_length_for,
)

__all__ = ["Prepared", "decide_task", "resolve_model_path", "pick_device", "read_data", "add_labels", "encode",
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
    """auto | cpu | cuda | cuda:N -> the device to use, checked against the GPUs this process can see."""
    import torch

    device = str(device)
    index = device[5:] if device.startswith("cuda:") else None
    if device not in ("auto", "cpu", "cuda") and not (index and index.isdigit()):
        raise RankwiseError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RankwiseError(f"--device {device} but no CUDA GPU is visible; use --device cpu")
    if index is not None and int(index) >= torch.cuda.device_count():
        raise RankwiseError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def read_data(data, *, info: DataInfo | None = None, text_columns: Sequence[str] | None = None,
              label_column: str | None = None, validation_split: float = 0.1, seed: int = 0, task: str = "auto",
              drop_empty: bool = False) -> Prepared:
    """Load splits and decide (or reuse) what the columns mean; empty texts are refused (or dropped)."""
    splits, kind = load_splits(data, validation_split=validation_split, seed=seed, keep_rows=info is None)
    if info is not None:  # evaluating a run: the columns must be the ones it was trained on
        cols = splits["validation"].column_names
        missing = [c for c in info.text_columns + ([info.label_column] if info.label_column else []) if c not in cols]
        if missing:
            raise RankwiseError(f"the data lacks column(s) {missing} that the run was trained on; it has {cols}")
        return Prepared(splits, info)
    eval_split = "test" if splits.get("test") is splits["validation"] else "validation"  # train + test folder
    if kind == "text":
        return Prepared(splits, DataInfo(source=str(data), kind="text", text_columns=["text"], eval_split=eval_split))
    kind, texts, label, how = decide_columns(splits["train"], text_columns, label_column,
                                             find_label=task != "causal-lm")
    line = describe_decision(texts, label, how)
    if line:
        print(line, file=sys.stderr)
    # An empty Alpaca output is a real answer (stop at once: the EOS is learned); an empty instruction is not.
    must_fill = ["instruction"] if kind == "instruction" else texts
    splits, dropped = drop_or_refuse_empty(splits, must_fill, label if task != "causal-lm" else None, drop_empty)
    splits = {name: _without_rows(ds) for name, ds in splits.items()}
    info = DataInfo(source=str(data), kind=kind, text_columns=texts, label_column=label, detected=how,
                    eval_split=eval_split, dropped_empty=dropped)
    return Prepared(splits, info)


def _without_rows(ds):
    return ds.remove_columns(ROW_COLUMN) if ROW_COLUMN in ds.column_names else ds


def add_labels(prepared: Prepared, label_names: Sequence[str] | None = None) -> None:
    """Fill in label type, class count and label map (only for seq-cls; causal LM has no labels)."""
    li = label_info(prepared.splits, prepared.info.label_column, label_names)
    prepared.info.label_type = li["label_type"]
    prepared.info.num_labels = li["num_labels"]
    prepared.info.id2label = li["id2label"]
    prepared.info.label2id = li.get("label2id")


def decide_task(model_path: str, info: DataInfo, task: str):
    """(task, model config): `task` ("auto" too) checked against the data and the model; one line on a mismatch."""
    from transformers import AutoConfig

    from .tasks import infer_task

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise RankwiseError(f"could not load model {model_path}: {str(e).splitlines()[0][:200]}") from None
    task = infer_task(task, info.kind, info.label_column is not None, config)
    if task == "seq-cls" and info.kind != "table":
        raise RankwiseError("--task seq-cls needs a table with a label column, not plain text/instructions")
    return task, config


def default_max_length(tokenizer, config, max_length: int | None) -> int:
    if max_length is not None and max_length < 8:
        raise RankwiseError(f"--max-length must be >= 8, got {max_length}")
    return max_length_for(tokenizer, config, max_length, default=_DEFAULT_MAX_LENGTH)


def encode(ds, task: str, info: DataInfo, tokenizer, max_length: int, n: int | None, seed: int,
           notice: TruncationNotice | None = None, pair_encoding: str = "joint"):
    """Subsample (seeded) then tokenize one split for the task. Plain text keeps its first `n` lines instead:
    shuffled lines packed into blocks would no longer be prose."""
    if info.kind == "text":
        ds = ds.select(range(min(n, len(ds)))) if n else ds
    else:
        ds = subsample(ds, n, seed)
    if task == "seq-cls":
        return encode_classification(ds, tokenizer, info, max_length, notice, pair_encoding)
    if info.kind == "instruction":
        return encode_instructions(ds, tokenizer, max_length, notice)
    if info.kind == "text" or len(info.text_columns) == 1:
        return encode_text_blocks(ds, tokenizer, max_length, column=info.text_columns[0])
    raise RankwiseError(f"causal-lm needs Alpaca columns (instruction, input, output) or one text column; "
                        f"got {info.text_columns}; pick one with --text-columns")


def make_trainer(model, tokenizer, task: str, label_type: str | None, *, out_dir: str, train_ds=None,
                 eval_ds=None, lr: float = 2e-3, epochs: float = 1.0, batch_size: int = 16,
                 max_steps: int | None = None, seed: int = 0, device: str = "cpu", progress: bool = True,
                 logging_steps: int = 10, eval_batch_size: int | None = None, options=None):
    """A Trainer that saves nothing by itself (the run is saved once, atomically, by the caller), except the
    `--save-steps` checkpoints of `options` (a TrainOptions) into `out_dir`."""
    from transformers import Trainer, TrainingArguments

    from .metrics import metrics_fn
    from .options import TrainOptions

    options = options or TrainOptions()
    kwargs = dict(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size or batch_size * 2,  # no gradients: twice the batch fits
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps else -1,
        learning_rate=lr,
        logging_steps=logging_steps,
        seed=seed,
        data_seed=seed,
        use_cpu=device == "cpu",
        disable_tqdm=not progress,
        remove_unused_columns=False,  # columns are already exactly the model's inputs
        label_names=["labels"],  # peft wrappers hide forward()'s signature from the Trainer's guess
        prediction_loss_only=task == "causal-lm",  # perplexity needs the loss only, not vocab-sized logits
        dataloader_pin_memory=device.startswith("cuda"),
    )
    kwargs.update(options.trainer_kwargs())  # --train-arg may also replace rankwise's defaults (logging_steps)
    try:
        args = TrainingArguments(**kwargs)
    except (ValueError, TypeError, ImportError) as e:  # e.g. bf16 on a GPU without it, a bad --train-arg pairing
        raise RankwiseError(f"Trainer rejected the settings: {str(e).strip().splitlines()[0][:300]}") from None
    _pin_device(args, device)
    try:
        trainer = Trainer(
            model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
            data_collator=collator(task, tokenizer),
            compute_metrics=None if task == "causal-lm" else metrics_fn(label_type or "class"),
        )
    except ValueError as e:  # settings that only clash once Trainer sees them (e.g. --train-arg pairings)
        raise RankwiseError(f"Trainer rejected the settings: {str(e).strip().splitlines()[0][:300]}") from None
    if task == "seq-cls":
        # A classification loss is a plain batch mean; it ignores `num_items_in_batch`. Trainer assumes any model
        # whose forward takes **kwargs normalises by it, and then neither divides by --grad-accum nor undoes
        # DDP's averaging: the loss (and gradient) would be grad_accum x / world_size x too large.
        trainer.model_accepts_loss_kwargs = False
    from .callbacks import LogAtSaves, StderrProgress

    quiet_trainer(trainer)
    if progress:
        trainer.add_callback(StderrProgress())
    trainer.add_callback(LogAtSaves())
    return trainer


def _pin_device(args, device: str) -> None:
    """--device cuda:N on one process: Trainer itself only knows "the first visible GPU" (and wraps every visible
    GPU in DataParallel); pin it to N. Launchers (torchrun, accelerate) place each process themselves."""
    if not device.startswith("cuda:") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    import torch

    torch.cuda.set_device(device)
    args.__dict__["_setup_devices"] = torch.device(device)  # the cached_property TrainingArguments.device reads
    args._n_gpu = 1


def quiet_trainer(trainer) -> None:
    """Drop Trainer's printers: its ProgressCallback writes loss dicts to stdout (tqdm.write), its
    PrinterCallback prints them; stdout is for the result JSON only (callbacks.StderrProgress takes over)."""
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
