"""Read a table the way a person does: which column is the label and which hold the text, judged by content when
the names say nothing, and rows with no text found before they train as "".

Names first (data.TEXT_COLUMN_SETS, data.LABEL_COLUMNS), content second:
- free text: a string column whose values have two or more words on average and are mostly distinct;
- a label: a column of strings, booleans, integers (or integer-valued floats) with few distinct values that is
  not free text. Two candidates for one role is an error naming both, never a guess, except that a column of
  several words per value never outranks a short categorical one: a person reads eight repeated review
  sentences as the text and "pos"/"neg" beside them as the label. With no free-text column, such a multi-word
  column that is not the label is the text.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

from ..types import RankwiseError
from .data import INSTRUCTION_COLUMNS, LABEL_COLUMNS, ROW_COLUMN, TEXT_COLUMN_SETS, column_values, detect_columns

__all__ = ["ROW_COLUMN", "ColumnProfile", "profile_columns", "decide_columns", "find_empty", "drop_or_refuse_empty",
           "describe_decision"]

_SAMPLE = 2000  # rows looked at per column: enough to tell text from labels, fast on a million-row file
_MAX_CLASSES = 100  # more distinct values than this is not a label a person would call low-cardinality
_SHOW_ROWS = 5  # rows named in an error before "and N more"


@dataclass
class ColumnProfile:
    name: str
    kind: str  # "str" | "int" | "float" | "bool" | "class" (a ClassLabel) | "other"
    n: int  # non-empty values sampled
    distinct: int
    words: float  # mean whitespace-separated words (strings only)
    int_like: bool  # floats that are all whole numbers (1.0, 2.0) read as classes

    def is_free_text(self, limit: int) -> bool:
        return self.kind == "str" and self.words >= 2 and self.distinct > limit

    @property
    def wordy(self) -> bool:
        """Several words per value: reads as text even when few values repeat (eight reviews over 60 rows)."""
        return self.kind == "str" and self.words >= 2

    def is_label(self, limit: int) -> bool:
        if self.kind in ("bool", "class"):
            return True
        discrete = self.kind in ("int", "str") or (self.kind == "float" and self.int_like)
        return discrete and 2 <= self.distinct <= limit and not self.is_free_text(limit)

    def describe(self) -> str:
        what = {"str": "strings", "int": "integers", "float": "integer-valued floats", "bool": "booleans",
                "class": "named classes"}.get(self.kind, self.kind)
        return f"{self.distinct} distinct {what}" if self.kind != "str" or self.words < 2 else \
            f"free text, {self.words:.1f} words on average"


def _kind(feature) -> str:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return "class"
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        return "str"
    if dtype == "bool":
        return "bool"
    if dtype and dtype.startswith(("int", "uint")):
        return "int"
    if dtype and dtype.startswith("float"):
        return "float"
    return "other"


def _sample(ds, seed: int = 0):
    """A seeded random sample of rows (files are often sorted by class: the head may hold one label only)."""
    if len(ds) <= _SAMPLE:
        return ds
    return ds.select(sorted(random.Random(seed).sample(range(len(ds)), _SAMPLE)))


def profile_columns(ds) -> list[ColumnProfile]:
    sample = _sample(ds)
    out = []
    for name, feature in sample.features.items():
        if name == ROW_COLUMN:
            continue
        kind = _kind(feature)
        values = [v for v in sample[name] if v is not None and (kind != "str" or v.strip())] if kind != "other" else []
        words = sum(len(v.split()) for v in values) / len(values) if kind == "str" and values else 0.0
        int_like = kind == "float" and bool(values) and all(float(v).is_integer() for v in values)
        distinct = len(set(values))
        out.append(ColumnProfile(name, kind, len(values), distinct, words, int_like))
    return out


def _limit(n: int) -> int:
    """How many distinct values a label may have: a quarter of the rows, at most _MAX_CLASSES, at least 2."""
    return max(2, min(_MAX_CLASSES, n // 4))


def decide_columns(ds, text_columns=None, label_column=None, find_label: bool = True) -> tuple[str, list, str | None, dict]:
    """(kind, text columns, label column, how each was decided) for the training split `ds`.

    `how` is saved with the run: {"text_columns": "given"|"name"|"content", "label_column": ...(+ "none"),
    "reasons": {column: what its content looked like}}."""
    cols = [c for c in ds.column_names if c != ROW_COLUMN]
    for c in [*(text_columns or ()), *([label_column] if label_column else [])]:
        if c not in cols:
            raise RankwiseError(f"unknown column {c!r}; the data has: {', '.join(cols)}")
    if label_column is None and text_columns and find_label:
        named = next((c for c in LABEL_COLUMNS if c in cols), None)
        if named in text_columns:
            raise RankwiseError(f"column {named!r} looks like the label but is listed in --text-columns: the model "
                                "would read its own answer; drop it there, or name the label with --label-column")
    if text_columns and label_column in text_columns:
        raise RankwiseError(f"the label column {label_column!r} is also in --text-columns {list(text_columns)}: "
                            "the model would read its own answer; list only input columns there")
    how = {"text_columns": "given" if text_columns else "name", "label_column": "given" if label_column else "name"}
    if not text_columns and all(c in cols for c in INSTRUCTION_COLUMNS) and not label_column:
        kind, texts, label = detect_columns(cols)
        return kind, texts, label, {"text_columns": "name", "label_column": "none"}
    named_label = label_column or next((c for c in LABEL_COLUMNS if c in cols and c not in (text_columns or ())), None)
    named_texts = list(text_columns) if text_columns else \
        next((list(s) for s in TEXT_COLUMN_SETS if all(c in cols for c in s) and named_label not in s), None)
    if named_label is not None and named_texts is not None:
        return "table", named_texts, named_label, how
    profiles = {p.name: p for p in profile_columns(ds)}
    reasons = {}
    label = named_label
    if label is None and find_label:
        label = _label_by_content(profiles, set(named_texts or ()))
        how["label_column"] = "content" if label else "none"
        if label:
            reasons[label] = profiles[label].describe()
    elif label is None:
        how["label_column"] = "none"
    texts = named_texts
    if texts is None:
        texts = _texts_by_content(profiles, label, cols)
        how["text_columns"] = "content"
        reasons.update({t: profiles[t].describe() for t in texts})
    if reasons:
        how["reasons"] = reasons
    return "table", texts, label, how


def _label_by_content(profiles: dict, exclude: set) -> str | None:
    found = [p for p in profiles.values() if p.name not in exclude and p.is_label(_limit(p.n))]
    short = [p for p in found if not p.wordy]
    if len(found) > 1 and len(short) == 1:
        return short[0].name  # free text never outranks a short categorical column as the label
    if len(found) > 1:
        listed = ", ".join(f"{p.name!r} ({p.describe()})" for p in found)
        raise RankwiseError(f"several columns could be the label: {listed}; name it with --label-column")
    return found[0].name if found else None


def _texts_by_content(profiles: dict, label: str | None, cols: list) -> list[str]:
    found = [p.name for p in profiles.values() if p.name != label and p.is_free_text(_limit(p.n))]
    if not found:  # text that repeats a handful of sentences is still text when it is not the label
        found = [p.name for p in profiles.values() if p.name != label and p.wordy]
    if not found:
        raise RankwiseError(f"no text column found among {', '.join(cols)} (by name or by content: no column of "
                            "mostly distinct, multi-word strings); name them with --text-columns")
    if len(found) > 2:
        raise RankwiseError(f"{len(found)} columns look like free text ({', '.join(found)}); name the one or two "
                            "inputs with --text-columns")
    return found


def describe_decision(texts: list, label: str | None, how: dict) -> str | None:
    """The line printed when content decided anything (a person should see what the model will read)."""
    if "content" not in (how.get("text_columns"), how.get("label_column")):
        return None
    reasons = how.get("reasons", {})

    def part(c):
        return f"{c!r} ({reasons[c]})" if c in reasons else repr(c)

    label_part = f"label {part(label)}" if label else "no label column"
    return (f"columns: text {' + '.join(part(t) for t in texts)}; {label_part}; by content, since no column has a "
            "known name (override with --text-columns / --label-column)")


# ----- empty texts --------------------------------------------------------------------------------------------
def _is_empty(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def find_empty(ds, columns: list[str]) -> list[int]:
    """Row numbers (1-based, in the source file when it was split) whose value in any `columns` is empty."""
    rows = column_values(ds, ROW_COLUMN) if ROW_COLUMN in ds.column_names else None
    bad = []
    for c in columns:
        for i, v in enumerate(column_values(ds, c)):
            if _is_empty(v):
                bad.append(rows[i] if rows is not None else i + 1)
    return sorted(set(bad))


def _named_rows(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:_SHOW_ROWS]))
    return shown + (f" and {len(rows) - _SHOW_ROWS} more" if len(rows) > _SHOW_ROWS else "")


def drop_or_refuse_empty(splits: dict, columns: list[str], label: str | None, drop: bool) -> tuple[dict, dict | None]:
    """Rows with an empty or missing text (or label) are an error naming them, or, with `drop`, dropped and counted.

    Returns (splits, {split: rows dropped} or None)."""
    check = [c for c in [*columns, *([label] if label else [])] if c]
    found = {}
    for name, ds in splits.items():
        if name == "validation" and splits.get("test") is ds:
            continue  # the same table under two names: count it once
        rows = find_empty(ds, [c for c in check if c in ds.column_names])
        if rows:
            found[name] = rows
    if not found:
        return splits, None
    if not drop:
        where = "; ".join(f"{split} rows {_named_rows(rows)}" for split, rows in found.items())
        what = f"text ({', '.join(columns)})" + (f" or label ({label})" if label else "")
        raise RankwiseError(f"empty or missing {what} in {where} (1 = first data row of its file); fill them in, "
                            "or pass --drop-empty to drop those rows")
    keep = {}
    for name, ds in splits.items():
        cols = [c for c in check if c in ds.column_names]
        keep[name] = ds.filter(lambda row: not any(_is_empty(row[c]) for c in cols), desc="dropping empty rows")
    if splits.get("test") is splits.get("validation"):
        keep["validation"] = keep["test"]
    for name, ds in keep.items():
        if len(ds) == 0:
            raise RankwiseError(f"every row of the {name} split has an empty text or label; nothing left to use")
    counts = {name: len(rows) for name, rows in found.items()}
    print(f"note: --drop-empty dropped {sum(counts.values())} rows with an empty text or label "
          f"({', '.join(f'{k} {v}' for k, v in counts.items())})", file=sys.stderr)
    return keep, counts
