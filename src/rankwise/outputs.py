"""Safe output folders: what `--out` may replace, and how a folder is written so nothing is ever half-done.

Every command that writes a folder (train, plan, merge, export, demo) goes through two calls:

    check_out(out, overwrite, protected=[model, data, plan])   # before any work: refuse what must not be replaced
    with atomic_dir(out) as tmp:                               # write into a sibling temp folder ...
        ...write files into tmp...                             # ... renamed onto `out` only on success

`--overwrite` replaces only a folder rankwise wrote (recognised by its marker files) or an empty one. It never
replaces the current directory or one of its ancestors, nor the model, data or plan the same command reads: the
temp folder is a sibling of `out`, so replacing a folder that contains the command's inputs (or the process's
working directory) would delete them.

Files (`analyze --out`, `eval --out`) go through `check_file_out` (never an input of the command, nor inside
one; a file rankwise did not write only with `--overwrite`) and `write_text_atomic`. Folders that commands add to
rather than replace (`sweep`, `report`) go through `check_folder_out`: new, empty, or one of their own kind.
Everything written keeps the user's umask: safetensors' `save_file` writes mode 600, `replace_dir` fixes that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .types import RankwiseError

__all__ = ["MARKER", "folder_kind", "check_out", "atomic_dir", "sweep_stale", "replace_dir", "mark",
           "check_file_out", "file_written_by_rankwise", "write_text_atomic", "check_folder_out", "apply_umask"]

# Written into folders that have no other rankwise file to be recognised by (a demo folder holds only run
# folders; an mlx export holds only mlx files): {"kind": "demo" | "export"}
MARKER = ".rankwise"
# Siblings we create next to an output folder: `.NAME.partial-PID` (being written), `.NAME.old-PID` (the folder
# being replaced), `.NAME.lora-PID` (export's scratch adapter). A dead PID means a killed run left it behind.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:partial|old|lora)-(?P<pid>\d+)$")


# ----- what rankwise wrote -------------------------------------------------------------------------------------
def _json_keys(path: Path) -> set[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def folder_kind(path: str | os.PathLike) -> str | None:
    """'run', 'plan', 'merge', 'export', 'demo' when `path` is a folder rankwise wrote; None otherwise.

    Recognised by marker files whose content is rankwise's, not by names alone: a run has task.json (with "task")
    or results.json (with "run_info"); a merged model or an export has task.json beside config.json or an adapter;
    a plan has plan.json (with "strategy" and "layers"); other folders carry a `.rankwise` marker (see `mark`); a
    folder holding only run folders is a demo folder."""
    p = Path(path)
    if not p.is_dir() or p.is_symlink():
        return None
    task = "task" in _json_keys(p / "task.json")
    if task and (p / "config.json").is_file():
        return "merge"
    if task and _json_keys(p / "task.json") >= {"exported_from"}:
        return "export"
    if task or "run_info" in _json_keys(p / "results.json"):
        return "run"
    if {"strategy", "layers"} <= _json_keys(p / "plan.json"):
        return "plan"
    kind = _marker_kind(p)
    if kind:
        return kind
    children = [c for c in p.iterdir() if not c.name.startswith(".")]
    if children and all(folder_kind(c) == "run" for c in children):
        return "demo"
    return None


def _marker_kind(p: Path) -> str | None:
    try:
        kind = json.loads((p / MARKER).read_text()).get("kind")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return kind if kind in ("run", "plan", "merge", "export", "demo") else None


def mark(folder: str | os.PathLike, kind: str) -> None:
    """Record that rankwise wrote `folder` (for kinds with no other telltale file), so --overwrite may replace it."""
    p = Path(folder)
    p.mkdir(parents=True, exist_ok=True)
    (p / MARKER).write_text(json.dumps({"kind": kind, "written_by": "rankwise"}) + "\n")


# ----- what may be replaced ------------------------------------------------------------------------------------
def _is_within(inner: Path, outer: Path) -> bool:
    """True when `inner` is `outer` or lies inside it (both resolved)."""
    return inner == outer or outer in inner.parents


def check_out(out: str | os.PathLike, overwrite: bool = False, *, protected: Iterable = (), flag: str = "--out",
              overwrite_flag: str | None = "--overwrite") -> Path:
    """Raise RankwiseError (one line naming the reason) unless `out` may be written; returns it as a Path.

    Refused always: the current directory or an ancestor of it; a path that is, or contains, a `protected` path
    (the model, data and plan of the same command); an existing file or symlink. An existing non-empty folder
    needs `overwrite`, and even then only one rankwise wrote (see `folder_kind`) is replaced."""
    out = Path(out)
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, real):
        what = "the current directory" if real == cwd else "an ancestor of the current directory"
        raise RankwiseError(f"refusing {flag} {out}: it is {what}, which would be deleted to write it; "
                            "give a new folder name")
    for p in protected:
        if p is None or not str(p) or not Path(p).exists():
            continue  # aliases and hub ids are not local files
        if _is_within(Path(p).resolve(), real):
            raise RankwiseError(f"refusing {flag} {out}: it is or contains {p}, which this command reads; "
                                "give another folder")
    if out.is_symlink():
        raise RankwiseError(f"refusing {flag} {out}: it is a symbolic link; give a real folder path")
    if not out.exists():
        return out
    if not out.is_dir():
        raise RankwiseError(f"{flag} {out} is an existing file; give a folder path")
    if not any(out.iterdir()):
        return out  # an empty folder holds nothing to lose
    if not overwrite:
        hint = f" or pass {overwrite_flag}" if overwrite_flag else ""
        raise RankwiseError(f"output {out} already exists; choose another {flag}{hint}")
    if folder_kind(out) is None:
        raise RankwiseError(f"refusing to overwrite {out}: it was not written by rankwise (no run, plan, merge, "
                            "export or demo marker files); choose another folder or empty it yourself")
    return out


# ----- output files ----------------------------------------------------------------------------------------
_SNIFF_LIMIT = 64 << 20  # a stats or metrics file is kilobytes; a larger file is not one rankwise wrote
_ANALYZE_HEAD = ("name", "shape")  # first columns of `rankwise analyze` csv and table output
_METRICS_KEYS = {"data", "split", "num_samples"}  # `rankwise eval` JSON


def file_written_by_rankwise(path: str | os.PathLike) -> bool:
    """True when `path` holds what `rankwise analyze --out` or `rankwise eval --out` writes, judged by content
    (like `folder_kind`): analyze JSON (rows with name and shape), its csv or table header, eval's metrics JSON."""
    p = Path(path)
    try:
        if not p.is_file() or p.stat().st_size > _SNIFF_LIMIT:
            return False
        text = p.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    try:
        data = json.loads(text)
    except ValueError:
        first = text.split("\n", 1)[0]
        return tuple(first.split(",")[:2]) == _ANALYZE_HEAD or tuple(first.split()[:2]) == _ANALYZE_HEAD
    if isinstance(data, dict):
        return _METRICS_KEYS <= set(data)
    return isinstance(data, list) and bool(data) and all(isinstance(r, dict) and {"name", "shape"} <= set(r)
                                                         for r in data)


def _input_conflict(real: Path, inputs: Iterable) -> str | None:
    """How `real` (a resolved output file) collides with one of the command's inputs, or None."""
    for p in inputs:
        if p is None or not str(p) or not Path(p).exists():
            continue  # aliases and hub ids are not local files
        rp = Path(p).resolve()
        if real == rp or (real.exists() and os.path.samefile(real, rp)):
            return f"it is {p}, which this command reads"
        if rp.is_dir() and rp in real.parents:
            return f"it lies inside {p}, which this command reads"
    return None


def check_file_out(out: str | os.PathLike | None, overwrite: bool = False, *, inputs: Iterable = (),
                   flag: str = "--out", overwrite_flag: str = "--overwrite") -> Path | None:
    """Raise RankwiseError (one line) unless the output FILE `out` may be written; call before any work.

    Refused always: a folder; any input of the same command (model, data, run, base model) or a path inside an
    input folder (a new file there could be read as part of it: a second weights file, a data split). Refused
    without `overwrite`: an existing file that rankwise did not write (see `file_written_by_rankwise`)."""
    if out is None or str(out) == "":
        return None
    out = Path(out)
    if out.is_dir():
        raise RankwiseError(f"{flag} {out} is a folder; give a file name (e.g. {out / 'stats.csv'})")
    clash = _input_conflict(out.resolve(), inputs)
    if clash:
        raise RankwiseError(f"refusing {flag} {out}: {clash}; write it elsewhere")
    if (out.exists() or out.is_symlink()) and not overwrite and not file_written_by_rankwise(out):
        raise RankwiseError(f"refusing to replace {out}: rankwise did not write it; choose another {flag} or pass "
                            f"{overwrite_flag}")
    return out


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a sibling temp file and a rename: a reader or a kill never sees half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)  # an ordinary open(): the user's umask applies
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----- folders commands add to (sweep, report) -----------------------------------------------------------------
def _is_sweep_dir(p: Path) -> bool:
    keys = _json_keys(p / "sweep.json")
    return {"schema", "experiment", "runs"} <= keys or {c.name for c in p.iterdir()} <= {".sweep.lock"}


def _is_report_dir(p: Path) -> bool:
    try:
        cells = json.loads((p / "cells.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(cells, list) and bool(cells) and all(
        isinstance(c, dict) and {"id", "task", "budget", "method"} <= set(c) for c in cells)


_FOLDER_KINDS = {"sweep": _is_sweep_dir, "report": _is_report_dir}


def check_folder_out(out: str | os.PathLike, kind: str, *, flag: str = "--out", inputs=()) -> Path:
    """Raise RankwiseError (one line) unless `out` may receive a `kind` ("sweep" or "report") folder's files.

    These commands add to a folder (a sweep resumes, a report rewrites its own files) instead of replacing it, so
    `--overwrite` has no say: allowed are a new path, an empty folder, or a folder of that kind (sweep.json of a
    sweep; cells.json of a report). Refused: the current directory or an ancestor (`.`, `..`), a file, a symbolic
    link, and any other folder: it holds files rankwise did not write (a user's own report.md). `inputs` (the
    experiment file a sweep runs) may lie in the folder: a study keeps its experiment.yaml beside its results, and
    the sweep writes none of its own files under that name."""
    out = Path(out)
    real, cwd = out.resolve(), Path.cwd().resolve()
    if _is_within(cwd, real):
        what = "the current directory" if real == cwd else "an ancestor of the current directory"
        raise RankwiseError(f"refusing {flag} {out}: it is {what}, where the {kind} would mix its files with "
                            "yours; give a new folder name")
    if out.is_symlink():
        raise RankwiseError(f"refusing {flag} {out}: it is a symbolic link; give a real folder path")
    if not out.exists():
        return out
    if not out.is_dir():
        raise RankwiseError(f"{flag} {out} is an existing file; give a folder path")
    mine = {Path(p).resolve() for p in inputs}
    if any(p.resolve() not in mine for p in out.iterdir()) and not _FOLDER_KINDS[kind](out):
        raise RankwiseError(f"refusing {flag} {out}: it holds files rankwise did not write (it is not a {kind} "
                            "folder); give a new or empty folder")
    return out


# ----- permissions ---------------------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set-and-restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: str | os.PathLike) -> None:
    """Give every file and folder under `root` the mode the user's umask gives a new one. Libraries that write
    through private temp files (safetensors' save_file: mode 600) would otherwise leave files only we can read.
    Hard-linked files (an mlx export's base weights) are the original's and keep its mode."""
    mask = _umask()
    root = Path(root)
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        if p.is_symlink() or (not p.is_dir() and st.st_nlink > 1):
            continue
        full = 0o777 if p.is_dir() or st.st_mode & 0o111 else 0o666
        if st.st_mode & 0o777 != full & ~mask:
            os.chmod(p, full & ~mask)


# ----- writing atomically --------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier call in this process: not in use any more
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def sweep_stale(out: str | os.PathLike) -> list[Path]:
    """Remove temp siblings of `out` left by killed runs (their PID is dead). Returns what was removed."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    removed = []
    for p in parent.iterdir():
        m = _TEMP_RE.match(p.name)
        if m and m.group("name") == out.name and not _pid_alive(int(m.group("pid"))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out`. An existing `out` is moved aside first and deleted only after the
    rename, so at every instant either the old or the new folder is complete at `out`'s path."""
    apply_umask(tmp)
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _raise_exit(signum, frame):  # noqa: ARG001 - the signal handler signature
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while the block runs, so `finally` clauses (temp cleanup) run on `kill`.
    Signal handlers can only be set from the main thread; elsewhere the default handling stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh sibling temp folder `.NAME.partial-PID`; on success it replaces `out`.

    On any exit without success (an exception, Ctrl-C, SIGTERM) the temp folder is removed and `out` is left as
    it was. Stale temp folders of killed runs are swept first. Call `check_out` before: this replaces `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with _sigterm_as_exit():
        try:
            tmp.mkdir()
            yield tmp
            replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
