"""Parsing and checking what users type, shared by `rankwise.cli` and `rankwise.training.commands`.

Every numeric flag is checked here (finite, in range) at parse time, so bad values fail in milliseconds with one
line, before any model loads. The same checks (`check_number`) guard the Python API's keyword arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from typing import Sequence

from .types import RankwiseError

__all__ = ["OneLineParser", "command_line", "parse_targets", "parse_set", "split_list", "check_number", "check_options",
           "number", "PLOT_SUFFIXES", "check_plot_path"]

# What matplotlib's savefig writes (Agg, PDF, PS, SVG, PGF backends); checked before any work is done.
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".eps", ".ps", ".pgf")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`rankwise train: error: ...`) plus a pointer to --help."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        message = re.sub(r"^argument ([^:]+): must ", r"\1 must ", message)  # "--lr must be > 0, got -1"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_targets(values: Sequence[str] | None):
    """CLI targets -> select_layers spec: names (space or comma separated), `re:REGEX`, or `all-linear`."""
    if not values:
        return None
    items = [v.strip() for raw in values for v in raw.split(",") if v.strip()]
    if len(items) == 1 and items[0].startswith("re:"):
        return items[0][3:]
    if any(i.startswith("re:") for i in items):
        raise RankwiseError("give either one re:REGEX or a list of module names, not both")
    return "all-linear" if items == ["all-linear"] else items


def parse_set(pairs: Sequence[str] | None) -> dict:
    """`--set key=value` options; values are read as JSON when they parse (numbers, true, null), else strings.

    NaN and infinities are refused here: no option of any strategy or method means anything with them."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RankwiseError(f"--set expects key=value, got {pair!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise RankwiseError(f"--set {key}={value}: the value must be a finite number")
        out[key.replace("-", "_")] = parsed
    return out


def split_list(values: Sequence[str] | None) -> list[str] | None:
    """`--text-columns a b` or `a,b` -> ['a', 'b'] (None when not given)."""
    if not values:
        return None
    return [v.strip() for raw in values for v in raw.split(",") if v.strip()]


def check_number(name: str, value, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, integer: bool = False, allow_none: bool = True):
    """Return `value` when it is a finite number in the range, else raise RankwiseError naming `name` and the
    range. `lo_open`/`hi_open` exclude the bound itself; `integer` also requires a whole number."""
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if integer else "a number"
        raise RankwiseError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise RankwiseError(f"{name} must be a finite number, got {value!r}")
    if integer and value != int(value):
        raise RankwiseError(f"{name} must be a whole number, got {value!r}")
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        raise RankwiseError(f"{name} must be {_range_text(lo, hi, lo_open, hi_open)}, got {value!r}")
    return value


def _range_text(lo, hi, lo_open, hi_open) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"{'<' if hi_open else '<='} {hi:g}"


def number(kind: type = float, **bounds):
    """An argparse `type=` that parses `kind` and checks it with `check_number(**bounds)` at parse time."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} is needed, "
                                             f"got {text!r}") from None
        try:
            return check_number("the value", value, integer=kind is int, **bounds)
        except RankwiseError as e:
            raise argparse.ArgumentTypeError(str(e).replace("the value ", "", 1)) from None

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def check_options(options: dict, defaults: dict, what: str) -> None:
    """Type-check `--set` options against the defaults of the function they configure: a float option takes a
    finite number, a bool option true/false, a string option a string. Options whose default is None take
    anything (the function checks them)."""
    for key, value in options.items():
        if key not in defaults:
            continue  # unknown names are reported by the registry with the allowed list
        default = defaults[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
            want = "true or false"
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if ok and isinstance(default, int) and not isinstance(default, bool):
                ok = value == int(value)
            want = "an integer" if isinstance(default, int) else "a finite number"
        elif isinstance(default, str):
            ok = isinstance(value, str)
            want = "a string"
        else:
            continue
        if not ok:
            raise RankwiseError(f"{what} option {key}={value!r} is not valid: it takes {want} "
                                f"(default {default!r})")


def check_plot_path(path: str | None, flag: str = "--plot") -> None:
    """An image path whose suffix matplotlib can write; checked before any work, not after it."""
    if path is None:
        return
    from pathlib import Path

    p = Path(path)
    if p.suffix.lower() not in PLOT_SUFFIXES:
        raise RankwiseError(f"{flag} {path}: unsupported image type {p.suffix or '(none)'!r}; use one of "
                            f"{', '.join(PLOT_SUFFIXES)}")
    if p.is_dir():
        raise RankwiseError(f"{flag} {path} is a folder; give an image file name such as plan.png")


def command_line(args=None) -> str:
    """The command as it was given, for results.json and reports to record: `rankwise` and the arguments `main`
    parsed (`args.argv`; sys.argv's when main read those, not the host's when it was called with a list)."""
    argv = getattr(args, "argv", None)
    return "rankwise " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
