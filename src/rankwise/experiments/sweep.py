"""`rankwise sweep`: every cell of an experiment's grid as one `rankwise train` in its own run folder, resumable.

    OUT/sweep.json          the current grid (runs, their arguments), the experiment file's text, the command
    OUT/runs/<run id>/      one finished run: peft adapter, plan.json, results.json (written by train, renamed
                            into place only when complete)
    OUT/logs/<run id>.log   the run's output
    OUT/attempts.jsonl      one line per start/end of a run (how many times each run was started)

Resume rules: a run whose results.json is complete is skipped; anything else under its id (a folder without
results, train's `.ID.partial-PID` temp folder from a killed run) is removed and the run starts from scratch.
Run ids hash the cell as written, so editing the grid adds or drops cells and leaves the others alone.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..outputs import check_folder_out
from ..types import RankwiseError
from .launchers import Job, make_launcher
from .results import MANIFEST, RUNS_DIR, is_finished, write_json_atomic
from .spec import Experiment, Run, load_experiment

__all__ = ["sweep", "plan_runs", "planned_params", "format_dry_run", "SweepSummary"]


class SweepSummary(dict):
    """{"total", "skipped", "ran", "failed": [run ids], "out"}"""


def _lock(out: Path):
    """One sweep per folder: a second one would start the same runs twice. The kernel drops the lock on kill."""
    import fcntl

    fh = open(out / ".sweep.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise RankwiseError(f"another `rankwise sweep` is running on {out}; wait for it or stop it") from None
    return fh


def _clean(runs_dir: Path, run_id: str) -> None:
    """Remove what a killed or failed run left: its folder without results, train's temp folders."""
    for p in [runs_dir / run_id, *runs_dir.glob(f".{run_id}.partial-*")]:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def plan_runs(exp: Experiment, out: Path) -> tuple[list[Run], list[Run]]:
    """(finished, to do) for the experiment's grid in `out`."""
    done, todo = [], []
    for run in exp.runs():
        (done if is_finished(out / RUNS_DIR / run.id) else todo).append(run)
    return done, todo


def _attempt(out: Path, run_id: str, event: str, **extra) -> None:
    line = {"run": run_id, "event": event, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "pid": os.getpid(), **extra}
    with open(out / "attempts.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")


def _write_manifest(exp: Experiment, out: Path, command: str) -> None:
    write_json_atomic(out / MANIFEST, {
        "schema": 1, "experiment": exp.to_dict(), "experiment_text": exp.text, "command": command, "host": _host(),
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": [r.to_dict() for r in exp.runs()],
    })


def _host() -> str:
    """The sweeping machine, for the report (each run records its own device and versions)."""
    import platform

    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{platform.node()}: {platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs{gpu}, Python {platform.python_version()}")


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by the kill tests in a subprocess
    raise _Terminated()


def sweep(experiment: str | os.PathLike, out: str | os.PathLike, *, jobs: int | None = None,
          launcher: str = "local", address: str | None = None, progress: bool = True,
          command: str | None = None) -> SweepSummary:
    """Run every unfinished cell of `experiment` into `out`. Returns a summary; failed runs are listed there
    (their logs in OUT/logs) and retried by the next sweep."""
    from tqdm.auto import tqdm

    check_folder_out(out, "sweep")  # never ., .., an ancestor, or a folder of the user's (rankwise.outputs)
    exp = load_experiment(experiment)  # every check before anything is written
    the_launcher = make_launcher(launcher, jobs=jobs, address=address, resources=exp.resources)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        _write_manifest(exp, out, command or "rankwise " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
        done, todo = plan_runs(exp, out)
        runs_dir = out / RUNS_DIR
        runs_dir.mkdir(exist_ok=True)
        for run in todo:
            _clean(runs_dir, run.id)
        summary = SweepSummary(total=len(done) + len(todo), skipped=len(done), ran=0, failed=[], out=str(out))
        jobs_ = [Job(r.id, tuple(r.train_args()), str(runs_dir / r.id), str(out / "logs" / f"{r.id}.log"))
                 for r in todo]
        bar = tqdm(total=summary["total"], initial=len(done), unit="run", desc="sweep", disable=not progress,
                   dynamic_ncols=True)
        starts: dict[str, float] = {}

        def on_start(job: Job) -> None:
            starts[job.id] = time.perf_counter()
            _attempt(out, job.id, "start")
            bar.set_postfix_str(job.id, refresh=True)

        try:
            for job, code in the_launcher.run(jobs_, on_start):
                if code is None:
                    continue
                ok = code == 0 and is_finished(job.out)
                _attempt(out, job.id, "done" if ok else "failed", exit_code=code,
                         seconds=round(time.perf_counter() - starts.get(job.id, time.perf_counter()), 1))
                if ok:
                    summary["ran"] += 1
                else:
                    summary["failed"].append(job.id)
                    _clean(runs_dir, job.id)
                    bar.write(f"run {job.id} failed (exit {code}): {_last_line(job.log)} [log: {job.log}]")
                bar.update(1)
        finally:
            bar.close()
        return summary
    except _Terminated:
        raise KeyboardInterrupt("terminated") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lock.close()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _last_line(log: str) -> str:
    try:
        lines = [ln for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:300]


# ----- dry run: what each run will really spend --------------------------------------------------------------

def planned_params(run: Run, cache: dict) -> int | None:
    """LoRA parameters the run will train (plans computed as train computes them; None where only training
    can tell, e.g. peft's EVA, data-driven strategies, methods with no dry-run hook)."""
    from .skeleton import targets_spec

    model, targets = run.settings["model"], run.settings.get("targets")
    budget = dict(budget_rank=run.budget) if isinstance(run.budget, int) else dict(budget=run.budget)
    key = (model, json.dumps(targets), json.dumps(run.entry.canonical(), sort_keys=True), str(run.budget))
    if key in cache:
        return cache[key]
    if run.entry.kind == "method":
        from ..methods import get_method

        hook = getattr(get_method(run.entry.name), "planned_params", None)
        value = None
        if hook is not None:
            from .skeleton import layers_of

            value = hook(layers_of(model, targets), run.budget, dict(run.entry.options))
        cache[key] = value
        return value
    from ..plan import make_plan
    from ..assets import resolve_model

    path = resolve_model(model)
    spec = targets_spec(targets)
    try:
        stats = _stats(path, spec, cache)
        plan = make_plan(path, run.entry.name, **budget, targets=spec, stats=stats, progress=False,
                         **run.entry.options)
        value = plan.spent
    except RankwiseError as e:
        if "metric" not in str(e) and "data" not in str(e):
            raise
        value = None  # needs calibration data: known once the run has measured it
    cache[key] = value
    return value


def _stats(path: str, spec, cache: dict):
    key = ("stats", path, json.dumps(spec))
    if key not in cache:
        from ..stats import analyze

        cache[key] = analyze(path, spec, progress=False)
    return cache[key]


def format_dry_run(exp: Experiment, out: Path) -> str:
    from ..allocators import parse_budget

    from .skeleton import layers_of

    done, todo = plan_runs(exp, out)
    finished = {r.id for r in done}
    cache: dict = {}
    rows = []
    for run in exp.runs():
        layers = layers_of(run.settings["model"], run.settings.get("targets"))
        b = parse_budget(None if isinstance(run.budget, int) else run.budget, layers,
                         budget_rank=run.budget if isinstance(run.budget, int) else None,
                         total_params=_total(run))
        spent = planned_params(run, cache)
        rows.append((run.id, "done" if run.id in finished else "todo", f"{b.params:,}",
                     "n/a" if spent is None else f"{spent:,}",
                     "" if spent is None else f"{(spent - b.params) / b.params:+.2%}"))
    head = ("run", "status", "budget", "lora params", "vs budget")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(head, widths))]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.append(f"{len(exp.runs())} runs: {len(done)} finished, {len(todo)} to run "
                 "(n/a: known only after calibration/training; recorded in results.json)")
    return "\n".join(lines)


def _total(run: Run) -> int | None:
    if isinstance(run.budget, str) and run.budget.strip().endswith("%"):
        from .skeleton import model_params

        return model_params(run.settings["model"])
    return None
