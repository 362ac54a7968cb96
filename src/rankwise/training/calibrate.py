"""Data for `plan --data` and `analyze --data`: the model with its task head and a calibration subset of the
TRAINING split, read and encoded exactly as `rankwise train` would (same column detection, task inference,
tokenizer, max length and seeded head). The validation split is never read: a folder's validation file is not
opened; a single file is split with the same seed as train and only the train part is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..stats.calibration import Calibration
from ..types import RankwiseError
from .data import DataInfo, _load_file, _split_files, _split_off, detect_columns, label_info, load_splits
from .prepare import decide_task, default_max_length, encode, quiet_libraries, resolve_model_path
from .tasks import collator, load_model, load_tokenizer

__all__ = ["load_train_split", "calibration_from_data", "DEFAULT_CALIB_SAMPLES"]

DEFAULT_CALIB_SAMPLES = 256


def load_train_split(data: str | os.PathLike, *, validation_split: float = 0.1, seed: int = 0):
    """(train Dataset, "table" | "text"): the rows `rankwise train` trains on, without reading validation."""
    p = Path(data)
    if not p.is_dir():  # one file (split as train splits it) or a hub id (online: loads what the hub has)
        splits, kind = load_splits(data, validation_split=validation_split, seed=seed)
        return splits["train"], kind
    files = _split_files(p)
    if "train" not in files:
        raise RankwiseError(f"no train file in {p}: expected train.jsonl/.csv/.tsv/.parquet/.txt")
    is_text = files["train"].suffix.lower() == ".txt"
    train = _load_file(files["train"])
    if "validation" not in files and "test" not in files:  # train itself is split: keep the same train part
        train = _split_off(train, validation_split, seed, shuffle=not is_text)["train"]
    return train, "text" if is_text else "table"


def calibration_from_data(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    samples: int = DEFAULT_CALIB_SAMPLES,
    seed: int = 0,
    batch_size: int = 16,
    task: str = "auto",
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    validation_split: float = 0.1,
    max_length: int | None = None,
    progress: bool = True,
) -> Calibration:
    """A Calibration over `samples` training examples of `data`, with the task-head model `train` would build."""
    from transformers import set_seed

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise RankwiseError(f"--calib-samples must be a positive integer, got {samples!r}")
    with quiet_libraries(progress):
        path = resolve_model_path(model)
        train, kind = load_train_split(data, validation_split=validation_split, seed=seed)
        if kind == "text":
            info = DataInfo(source=str(data), kind="text", text_columns=["text"])
        else:
            kind, texts, label = detect_columns(train.column_names, text_columns, label_column)
            info = DataInfo(source=str(data), kind=kind, text_columns=texts, label_column=label)
        task, config = decide_task(path, info, task)
        if task == "seq-cls":
            li = label_info({"train": train}, info.label_column)
            info.label_type, info.num_labels = li["label_type"], li["num_labels"]
            info.id2label, info.label2id = li["id2label"], li.get("label2id")
        tokenizer = load_tokenizer(path)
        length = default_max_length(tokenizer, config, max_length)
        # Plain text is packed into blocks first (its rows are lines, not examples); tables encode only the
        # seeded subset, which is the subset calibrate() would draw from the fully encoded split.
        encoded = encode(train, task, info, tokenizer, length, None if kind == "text" else samples, seed)
        set_seed(seed)  # the new head is initialised as `rankwise train --seed` initialises it
        head_model = load_model(path, task, info)
    return Calibration(encoded, collator(task, tokenizer), model=head_model, data=str(data), samples=samples,
                       seed=seed, batch_size=batch_size, task=task)
