"""Load a data set (folder, single file, or hub id) and detect what is in it: text columns, label column, label type.

Everything here returns plain `datasets` objects plus a `DataInfo` describing them, so the task code never guesses.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..types import RankwiseError

__all__ = [
    "DataInfo",
    "DATA_EXTENSIONS",
    "TEXT_COLUMN_SETS",
    "LABEL_COLUMNS",
    "INSTRUCTION_COLUMNS",
    "ROW_COLUMN",
    "load_splits",
    "detect_columns",
    "label_info",
    "label_key",
    "apply_label_names",
    "subsample",
    "column_values",
]

# Loader name and extra keyword arguments for `datasets.load_dataset`, by file extension.
DATA_EXTENSIONS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
# Tried in order: pairs before singles, so `sentence1`+`sentence2` wins over a lone `sentence`.
TEXT_COLUMN_SETS = (
    ("sentence1", "sentence2"),
    ("question", "passage"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("sentence",),
    ("text",),
    ("content",),
    ("review",),
    ("document",),
    ("tweet",),
)
LABEL_COLUMNS = ("label", "labels", "sentiment", "score", "target", "class", "category", "y")
INSTRUCTION_COLUMNS = ("instruction", "output")  # Alpaca format; `input` is optional
# 1-based row number in the source file, kept through a shuffled split (here, not in columns.py, which imports
# this module: the split adds it, the column decision reads it)
ROW_COLUMN = "__rankwise_row__"


def column_values(ds, column: str) -> list:
    """A column as a Python list, through Arrow: datasets 5's `ds[column]` is a lazy Column that formats row by
    row when iterated (3 s for SST-2's 67k labels, 15 ms this way). The split's row selection is kept."""
    return ds.with_format("arrow")[column].to_pylist()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")  # owner/name or owner/name:config
_SPLIT_NAMES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev", "eval"),
    "test": ("test",),
}


@dataclass
class DataInfo:
    """What the data holds, decided once and saved with the run (predict and eval reuse it)."""

    source: str
    kind: str  # "table" | "text" (plain .txt) | "instruction" (Alpaca)
    text_columns: list[str] = field(default_factory=list)
    label_column: str | None = None
    label_type: str | None = None  # "class" | "regression"
    id2label: dict[int, str] | None = None  # set for string labels and named hub classes
    num_labels: int | None = None
    # Raw label value -> class id, only for string (or non 0..K-1 integer) labels.
    label2id: dict[str, int] | None = None
    eval_split: str = "validation"  # "test" for a folder with train + test files only
    detected: dict | None = None  # how the columns were chosen: given, by name, or by content (and why)
    dropped_empty: dict | None = None  # {split: rows} dropped by --drop-empty

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        if self.id2label is not None:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataInfo":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if d.get("id2label") is not None:
            d["id2label"] = {int(k): v for k, v in d["id2label"].items()}
        return cls(**d)


# ----- loading ------------------------------------------------------------------------------------------------
def _encoding(path: Path) -> str:
    """utf-8 unless the first MiB does not decode (the embedded tweets CSV is latin-1)."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # a cut multi-byte character at the end is fine
            return "latin-1"
    return "utf-8"


def _load_file(path: Path):
    """One local file -> a `datasets.Dataset`, with one-line errors for missing, empty or unreadable files."""
    import datasets

    ext = path.suffix.lower()
    if not path.is_file():
        raise RankwiseError(f"data file {path} does not exist")
    if ext not in DATA_EXTENSIONS:
        raise RankwiseError(f"unsupported data file {path.name}: use one of {', '.join(DATA_EXTENSIONS)}")
    if path.stat().st_size == 0:
        raise RankwiseError(f"data file {path} is empty")
    loader, kwargs = DATA_EXTENSIONS[ext]
    if loader in ("csv", "text"):
        kwargs = {**kwargs, "encoding": _encoding(path)}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one local file: the loader's bars are noise
    try:
        ds = datasets.load_dataset(loader, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # pyarrow/pandas raise many types; all mean "this file does not parse"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        cause = e.__cause__ or e.__context__
        if cause is not None and str(cause):
            msg = str(cause).splitlines()[0]
        raise RankwiseError(f"could not read {path}: {msg[:300]} (mixed types in one column?)") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if len(ds) == 0:
        raise RankwiseError(f"data file {path} has no rows")
    return ds


def _split_files(folder: Path) -> dict[str, Path]:
    """{split: file} for train/validation/test files in a folder (by stem, any supported extension)."""
    found: dict[str, Path] = {}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in DATA_EXTENSIONS)
    for split, stems in _SPLIT_NAMES.items():
        for p in files:
            if p.stem.lower() in stems and split not in found:
                found[split] = p
    if "train" not in found and len(files) == 1:
        found["train"] = files[0]  # tinyshakespeare/input.txt: one file, any name
    return found


def _split_off(ds, fraction: float, seed: int, shuffle: bool, keep_rows: bool = False):
    if not 0 < fraction < 1:
        raise RankwiseError(f"--validation-split must be between 0 and 1, got {fraction}")
    if len(ds) < 2:
        raise RankwiseError("a single data file needs at least 2 rows to split off validation")
    n_val = max(1, int(round(len(ds) * fraction)))
    if keep_rows:  # a shuffled split loses the file's row order; errors must still name rows a person can find
        ds = ds.add_column(ROW_COLUMN, list(range(1, len(ds) + 1)))
    # Plain text is split contiguously (the tail), so validation is unseen prose, not shuffled neighbours.
    parts = ds.train_test_split(test_size=n_val, seed=seed, shuffle=shuffle)
    return {"train": parts["train"], "validation": parts["test"]}


def _load_hub(spec: str) -> dict:
    import datasets

    name, _, config = spec.partition(":")
    try:
        dd = datasets.load_dataset(name, config or None)
    except Exception as e:
        raise RankwiseError(f"{spec!r} is no local folder or file, and loading it as a hub data set failed "
                            f"({str(e).splitlines()[0][:200]}); hub ids need network (HF_HUB_OFFLINE unset)") from None
    return dict(dd)


def load_splits(data: str | os.PathLike, *, validation_split: float = 0.1, seed: int = 0,
                keep_rows: bool = False) -> tuple[dict, str]:
    """Data spec -> ({split: Dataset} with at least train and validation, kind-of-source string).

    A folder with train + test only evaluates on test: splits["validation"] is then splits["test"] (the same
    object). `keep_rows` adds ROW_COLUMN (source-file row numbers) to a table that is split here."""
    p = Path(data)
    if p.is_dir():
        files = _split_files(p)
        if "train" not in files:
            raise RankwiseError(f"no train file in {p}: expected train.jsonl/.csv/.tsv/.parquet/.txt "
                                "(plus validation.* and optionally test.*)")
        splits = {s: _load_file(f) for s, f in files.items()}
        is_text = files["train"].suffix.lower() == ".txt"
        if "validation" not in splits:
            if "test" in splits:
                splits["validation"] = splits["test"]  # ag_news ships train + test only
            else:
                splits.update(_split_off(splits["train"], validation_split, seed, shuffle=not is_text,
                                         keep_rows=keep_rows and not is_text))
        return splits, "text" if is_text else "table"
    if p.exists() or p.suffix.lower() in DATA_EXTENSIONS or not _HUB_ID.match(str(data)):
        ds = _load_file(p)
        is_text = p.suffix.lower() == ".txt"
        parts = _split_off(ds, validation_split, seed, shuffle=not is_text, keep_rows=keep_rows and not is_text)
        return parts, "text" if is_text else "table"
    # owner/name[:config] and no such local path: a hub data set (GLUE's test labels are -1; test is unused)
    splits = _load_hub(str(data))
    if "train" not in splits:
        raise RankwiseError(f"hub data set {data!r} has no train split (has {sorted(splits)})")
    if "validation" not in splits:
        splits.update(_split_off(splits["train"], validation_split, seed, shuffle=True, keep_rows=keep_rows))
    return splits, "table"


# ----- detection ----------------------------------------------------------------------------------------------
def detect_columns(columns: Sequence[str], text_columns: Sequence[str] | None = None,
                   label_column: str | None = None) -> tuple[str, list[str], str | None]:
    """(kind, text columns, label column) from the column names; explicit choices are checked, not guessed."""
    cols = list(columns)
    for c in [*(text_columns or ()), *([label_column] if label_column else [])]:
        if c not in cols:
            raise RankwiseError(f"unknown column {c!r}; the data has: {', '.join(cols)}")
    if not text_columns and all(c in cols for c in INSTRUCTION_COLUMNS) and not label_column:
        return "instruction", [c for c in ("instruction", "input", "output") if c in cols], None
    if label_column is None:
        label_column = next((c for c in LABEL_COLUMNS if c in cols), None)
    if not text_columns:
        found = next((s for s in TEXT_COLUMN_SETS if all(c in cols for c in s)), None)
        if found is None:
            raise RankwiseError(f"no text column found among {', '.join(cols)}; name them with --text-columns")
        text_columns = list(found)
    return "table", list(text_columns), label_column


def _is_number(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def _whole(v) -> bool:
    return isinstance(v, (int, bool)) or (isinstance(v, float) and v.is_integer())


def label_key(value) -> str:
    """The label map key of a raw label: 1, 1.0, "1" and "1.0" are one class; any other string is itself."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and _is_number(value) and float(value).is_integer():
        return str(int(float(value)))
    return str(value)


def label_info(splits: dict, column: str, label_names: Sequence[str] | None = None) -> dict:
    """Decide the head from the label values: whole numbers (1, 1.0, "1") -> classes, other floats ->
    regression, strings -> a label map. `label_names` names the classes (in class-id order)."""
    return apply_label_names(_label_info(splits, column), label_names, column)


def _label_info(splits: dict, column: str) -> dict:
    import datasets

    train = splits["train"]
    feature = train.features[column]
    if isinstance(feature, datasets.ClassLabel):  # hub data sets name their classes
        names = list(feature.names)
        return {"label_type": "class", "num_labels": len(names), "id2label": dict(enumerate(names))}
    values = [v for s in ("train", "validation") if s in splits for v in column_values(splits[s], column)]
    if any(v is None for v in values):
        raise RankwiseError(f"label column {column!r} has empty values; fill or drop those rows (--drop-empty)")
    kinds = {type(v) for v in values}
    if kinds == {bool} and set(values) == {False, True}:
        return {"label_type": "class", "num_labels": 2, "id2label": {0: "False", 1: "True"}}
    if kinds <= {int, float, bool} and all(_whole(v) for v in values):
        # 0, 1, 1.0: JSON and pandas turn a column with one 1.0 into floats; a person still reads classes
        classes = sorted(set(int(v) for v in values))
        if classes == list(range(len(classes))) and len(classes) >= 2:
            return {"label_type": "class", "num_labels": len(classes), "id2label": None}
        # labels such as {1, 2} or {0, 5}: map them onto 0..K-1 rather than train empty classes
        return _label_map([str(c) for c in classes], numeric=True)
    if kinds <= {int, float}:
        return {"label_type": "regression", "num_labels": 1, "id2label": None}
    if kinds == {str}:
        numeric = [_is_number(v) for v in values]
        if any(numeric) and not all(numeric):
            bad = next(v for v, n in zip(values, numeric) if n)
            raise RankwiseError(f"label column {column!r} mixes numbers ({bad!r}) and text; "
                                "use one type of label per column")
        if all(numeric):  # CSV numbers come back as strings only when pandas saw text; treat as classes
            keys = {label_key(v) for v in values}
            return _label_map(sorted(keys, key=float), numeric=True)
        return _label_map(sorted(set(values)), numeric=False)
    raise RankwiseError(f"label column {column!r} mixes types {sorted(k.__name__ for k in kinds)}; "
                        "use one type of label per column")


def apply_label_names(li: dict, names: Sequence[str] | None, column: str = "label") -> dict:
    """`--label-names a,b,c`: names for integer classes 0..K-1 (or for the sorted values of a mapped column)."""
    if not names:
        return li
    names = [str(n) for n in names]
    if li["label_type"] != "class":
        raise RankwiseError(f"--label-names names classes, but {column!r} holds continuous values (regression)")
    if li.get("label2id") and not all(_is_number(k) for k in li["label2id"]):
        raise RankwiseError(f"--label-names is for numbered classes; {column!r} already holds names "
                            f"({', '.join(sorted(li['label2id'])[:5])})")
    if len(names) != li["num_labels"]:
        raise RankwiseError(f"--label-names gives {len(names)} names but {column!r} has {li['num_labels']} classes")
    if len(set(names)) != len(names) or not all(n.strip() for n in names):
        raise RankwiseError(f"--label-names must be distinct and non-empty, got {names}")
    return {**li, "id2label": dict(enumerate(names))}


def _label_map(names: list[str], numeric: bool) -> dict:
    if len(names) < 2:
        raise RankwiseError(f"the label column has a single class ({names[0]!r}); classification needs two or more")
    return {"label_type": "class", "num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}}


def subsample(ds, n: int | None, seed: int):
    """A seeded random subset of `n` rows (files are often sorted by class, so the first n would be one class)."""
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise RankwiseError(f"sample counts must be positive, got {n}")
    return ds.shuffle(seed=seed).select(range(n))
