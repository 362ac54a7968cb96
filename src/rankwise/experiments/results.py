"""Read and validate the files a sweep leaves: each run's results.json, the sweep's sweep.json manifest.

A run counts as finished only when its results.json is complete (schema, run_info, train_info with lora_params,
eval); anything else is a run to redo. Writes go through `write_json_atomic` (temp file + rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..training.record import CorruptRecord
from ..types import RankwiseError

__all__ = ["RunResult", "headline_metric", "LOWER_IS_BETTER", "REFERENCES", "write_json_atomic", "load_results",
           "is_finished", "read_manifest", "collect", "MANIFEST", "RUNS_DIR"]

LOWER_IS_BETTER = ("eval_loss", "perplexity", "eval_mse")
# What every cell of a task and budget is compared with: uniform LoRA on every target, else, where it cannot run
# (a budget below rank 1 on every layer), uniform LoRA on query/value (the common default), when the grid has it.
REFERENCES = ("uniform", "uniform_qv")
_DEFAULT_METRICS = ("eval_pearson", "eval_accuracy", "eval_loss")  # CoLA: set metric: eval_mcc
MANIFEST = "sweep.json"
RUNS_DIR = "runs"
_SCHEMA = 1
_TRAIN_KEYS = ("lora_params", "trainable_params", "wall_time_s", "peak_memory_bytes")


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write JSON so that a reader (or a kill) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_results(path: str | os.PathLike) -> dict:
    """A run's results.json (a run folder or the file itself), checked; RankwiseError names what is missing."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise RankwiseError(f"{p} does not exist")
    try:
        r = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RankwiseError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(r, dict):
        raise RankwiseError(f"{p} is not a results object")
    if r.get("schema") != _SCHEMA:
        raise RankwiseError(f"{p} has results schema {r.get('schema')!r}; this rankwise reads schema {_SCHEMA}")
    for key in ("run_info", "train_info", "eval"):
        if not isinstance(r.get(key), dict):
            raise RankwiseError(f"{p} has no {key} section")
    missing = [k for k in _TRAIN_KEYS if k not in r["train_info"]]
    if missing:
        raise RankwiseError(f"{p} train_info lacks {', '.join(missing)}")
    if not isinstance(r["train_info"]["lora_params"], int) or r["train_info"]["lora_params"] <= 0:
        raise RankwiseError(f"{p} train_info.lora_params must be a positive integer")
    from ..training.record import check_results_json

    return check_results_json(r, str(p))  # complete but of wrong types: CorruptRecord naming the field


def headline_metric(task: str, evals: list[dict], chosen: dict) -> str:
    """The metric a task is judged by: `tasks.T.metric` if set, else the first of pearson, accuracy, loss that
    every run reports. The report's tables and the tuning choice use the same rule."""
    keys = set.intersection(*(set(e) for e in evals)) if evals else set()
    if chosen.get(task):
        if chosen[task] not in keys:
            raise RankwiseError(f"task {task}: metric {chosen[task]!r} is not in every run's eval; "
                                f"available: {', '.join(sorted(keys))}")
        return chosen[task]
    for m in _DEFAULT_METRICS:
        if m in keys:
            return m
    raise RankwiseError(f"task {task}: no headline metric among {sorted(keys)}; set tasks.{task}.metric")


def is_finished(run_dir: str | os.PathLike) -> bool:
    try:
        load_results(run_dir)
        return True
    except RankwiseError:
        return False


def read_manifest(sweep_dir: str | os.PathLike) -> dict | None:
    p = Path(sweep_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RankwiseError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("runs"), list):
        raise RankwiseError(f"{p} is not a sweep manifest (no runs list)")
    return m


@dataclass
class RunResult:
    """One finished run, as the report sees it."""

    id: str
    dir: Path
    task: str
    label: str  # method/strategy label in the grid
    budget: str  # budget label: r4, b300k
    seed: int
    results: dict = field(repr=False)

    @property
    def lora_params(self) -> int:
        """LoRA parameters of the adapter the run ends with, the count budgets are compared by: a dynamic method's
        final count (AdaLoRA starts larger and prunes to its budget), else train_info.lora_params."""
        final = (self.results.get("method_info") or {}).get("final_lora_params")
        if isinstance(final, int) and not isinstance(final, bool) and final > 0:
            return final
        return self.peak_lora_params

    @property
    def peak_lora_params(self) -> int:
        """The most LoRA parameters the run trained at once (train_info.lora_params)."""
        return int(self.results["train_info"]["lora_params"])

    @property
    def eval(self) -> dict:
        return self.results["eval"]

    @property
    def train_info(self) -> dict:
        return self.results["train_info"]

    @property
    def run_info(self) -> dict:
        return self.results["run_info"]


def _label_of(r: dict) -> str:
    info = r["run_info"]
    method = info.get("method", "lora")
    return str(info.get("strategy") or "lora") if method == "lora" else str(method)


def _budget_of(r: dict) -> str:
    spec = str((r["run_info"].get("budget") or {}).get("spec", "")) or "?"
    return f"r{spec.split()[-1]}" if spec.startswith("rank ") else f"b{spec}"


def collect(sweep_dir: str | os.PathLike) -> tuple[list[RunResult], list[str]]:
    """Every finished run of a sweep folder, and notes about what was left out (unfinished, not in the grid).

    With a sweep.json, its runs (the current grid) are read and labelled as the grid names them; without one,
    every results.json below the folder is read and labelled from its run_info."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise RankwiseError(f"{root} is not a folder")
    manifest = read_manifest(root)
    found, notes = [], []
    if manifest is not None:
        waiting: dict = {}  # task -> runs of the grid that have no folder yet (a sweep under way): counted, not listed
        for row in manifest["runs"]:
            d = root / RUNS_DIR / row["id"]
            if not d.exists():
                waiting[row["task"]] = waiting.get(row["task"], 0) + 1
                continue
            try:
                r = load_results(d)
            except CorruptRecord:
                raise  # not unfinished: a file someone edited; a report leaving it out would change the numbers
            except RankwiseError:
                notes.append(f"{row['id']}: not finished (no complete results.json)")
                continue
            b = row["budget"]
            found.append(RunResult(row["id"], d, row["task"], row["label"],
                                   f"r{b}" if isinstance(b, int) else f"b{b}", int(row["seed"]), r))
        if waiting:
            notes.append(f"{sum(waiting.values())} runs of the grid have not started yet ("
                         + ", ".join(f"{t}: {n}" for t, n in waiting.items()) + ")")
        pending = int((manifest.get("tuning") or {}).get("pending_grid_runs") or 0)
        if pending:
            notes.append(f"{pending} more grid runs wait for their tuning cells' choices")
        listed = {row["id"] for row in manifest["runs"]}
        extra = [p.parent.name for p in (root / RUNS_DIR).glob("*/results.json") if p.parent.name not in listed]
        if extra:
            notes.append(f"{len(extra)} run folders are not in the current grid and were ignored: "
                         f"{', '.join(sorted(extra)[:5])}{' ...' if len(extra) > 5 else ''}")
        return found, notes
    for p in sorted(root.rglob("results.json")):
        try:
            r = load_results(p)
        except CorruptRecord:
            raise
        except RankwiseError as e:
            notes.append(str(e))
            continue
        task = Path(str(r["run_info"].get("data", "data"))).name or "data"
        found.append(RunResult(p.parent.name, p.parent, task, _label_of(r), _budget_of(r),
                               int(r["run_info"].get("seed", 0)), r))
    if not found and not notes:
        raise RankwiseError(f"{root} holds no results.json (give the --out folder of `rankwise sweep`)")
    return found, notes
