"""`rankwise sweep`: every cell of an experiment's grid as one `rankwise train` in its own run folder, resumable.

    OUT/sweep.json          the current grid (runs, their arguments), the experiment file's text, the command
    OUT/runs/<run id>/      one finished run: peft adapter, plan.json, results.json (written by train, renamed
                            into place only when complete)
    OUT/tuning/<run id>/    with a tune: section, one candidate's run on the held-out training rows; a cell that
                            failed (diverged) leaves <run id>.failed.json: its candidate scores worst
    OUT/logs/<run id>.log   the run's output
    OUT/attempts.jsonl      one line per start/end of a run (how many times each run was started)

Resume rules: a run whose results.json is complete is skipped; anything else under its id (a folder without
results, train's `.ID.partial-PID` temp folder from a killed run) is removed and the run starts from scratch.
Run ids hash the cell as written, so editing the grid adds or drops cells and leaves the others alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

from ..outputs import check_folder_out
from ..parsing import command_line
from ..types import RankwiseError
from .launchers import Job, make_launcher
from .results import MANIFEST, RUNS_DIR, is_finished, write_json_atomic
from .spec import Experiment, Run, load_experiment
from .tuning import FAILED, tuning_cells, tuning_state

__all__ = ["sweep", "plan_runs", "planned_params", "format_dry_run", "check_train_flags", "tuning_state",
           "SweepSummary", "FAILED"]


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


def plan_runs(exp: Experiment, out: Path, choices: dict | None = None) -> tuple[list[Run], list[Run]]:
    """(finished, to do) among the grid cells whose settings are known (tuned ones once chosen)."""
    done, todo = [], []
    for run in exp.runs(_choices(exp, out) if choices is None else choices):
        if not run.pending:
            (done if is_finished(out / run.folder / run.id) else todo).append(run)
    return done, todo


def _choices(exp: Experiment, out: Path) -> dict:
    return tuning_state(exp, out)[0] if exp.tune is not None else {}


def _attempt(out: Path, run_id: str, event: str, **extra) -> None:
    line = {"run": run_id, "event": event, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "pid": os.getpid(), **extra}
    with open(out / "attempts.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")


def _write_manifest(exp: Experiment, out: Path, command: str) -> None:
    """sweep.json: the grid's cells with settings known (tuned cells once chosen), the tuning table and choices."""
    manifest = {
        "schema": 1, "experiment": exp.to_dict(), "experiment_text": exp.text, "command": command, "host": _host(),
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if exp.tune is not None:
        cells, choices, table = tuning_cells(exp, out)
        runs = exp.runs(choices)
        manifest["tuning"] = {
            "spec": exp.tune.to_dict(), "table": table,
            "choices": [{"task": t, "label": lab, "budget": b, "values": v} for (t, lab, b), v in choices.items()],
            "runs": [r.to_dict() for r in cells],
            "pending_grid_runs": sum(r.pending for r in runs)}
        manifest["runs"] = [r.to_dict() for r in runs if not r.pending]
    else:
        manifest["runs"] = [r.to_dict() for r in exp.runs()]
    write_json_atomic(out / MANIFEST, manifest)


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

    check_folder_out(out, "sweep", inputs=[experiment])  # never ., .., an ancestor, or a folder of the user's (rankwise.outputs)
    if launcher == "local":  # the fork server's imports (seconds) overlap the checks below (seconds too)
        make_launcher(launcher, jobs=jobs, address=address, resources={}).warm_up()
    exp = load_experiment(experiment)  # every check before anything is written
    check_train_flags([*exp.tuning_runs(), *exp.runs({})])
    the_launcher = make_launcher(launcher, jobs=jobs, address=address, resources=exp.resources)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        command = command or command_line()
        _write_manifest(exp, out, command)
        summary = SweepSummary(total=0, skipped=0, ran=0, failed=[], out=str(out))
        bar = tqdm(total=0, unit="run", desc="sweep", disable=not progress, dynamic_ncols=True)
        try:
            # Task by task: its tuning cells, then its grid cells (their settings need the choice); a task's
            # grid starts as soon as its own tuning is done.
            for task in exp.tasks:
                tried: set = set()
                while True:  # tuning cells, then any extensions their results call for (tune.extend)
                    cells = [r for r in tuning_cells(exp, out)[0] if r.task == task and r.id not in tried]
                    if not cells:
                        break
                    tried |= {r.id for r in cells}
                    _run_cells(cells, out, the_launcher, summary, bar)
                    _write_manifest(exp, out, command)
                cells = [r for r in exp.runs(_choices(exp, out)) if r.task == task]
                summary["pending"] = summary.get("pending", 0) + sum(r.pending for r in cells)
                _run_cells([r for r in cells if not r.pending], out, the_launcher, summary, bar)
                _write_manifest(exp, out, command)
        finally:
            bar.close()
        return summary
    except _Terminated:
        raise KeyboardInterrupt("terminated") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lock.close()


def _run_cells(cells: list[Run], out: Path, launcher, summary: SweepSummary, bar) -> None:
    """Run the unfinished cells of one phase; finished ones are counted as skipped."""
    todo = []
    for r in cells:
        finished = is_finished(out / r.folder / r.id)
        failed_for_good = r.phase == "tune" and (out / r.folder / f"{r.id}{FAILED}").is_file()
        if not finished and not failed_for_good:
            todo.append(r)
    summary["total"] += len(cells)
    summary["skipped"] += len(cells) - len(todo)
    bar.total = summary["total"]
    bar.update(len(cells) - len(todo))
    by_id = {r.id: r for r in todo}
    for r in todo:
        (out / r.folder).mkdir(exist_ok=True)
        _clean(out / r.folder, r.id)
    jobs_ = [Job(r.id, tuple(r.train_args()), str(out / r.folder / r.id), str(out / "logs" / f"{r.id}.log"))
             for r in todo]
    starts: dict[str, float] = {}

    def on_start(job: Job) -> None:
        starts[job.id] = time.perf_counter()
        _attempt(out, job.id, "start")
        bar.set_postfix_str(job.id, refresh=True)

    for job, code in launcher.run(jobs_, on_start):
        if code is None:
            continue
        ok = code == 0 and is_finished(job.out)
        seconds = round(time.perf_counter() - starts.get(job.id, time.perf_counter()), 1)
        _attempt(out, job.id, "done" if ok else "failed", exit_code=code, seconds=seconds)
        if ok:
            summary["ran"] += 1
        else:
            summary["failed"].append(job.id)
            _clean(Path(job.out).parent, job.id)
            why = _last_line(job.log)
            bar.write(f"run {job.id} failed (exit {code}): {why} [log: {job.log}]")
            if by_id[job.id].phase == "tune" and code > 0:  # killed (code < 0) is not a result; a failure is
                write_json_atomic(Path(job.out).parent / f"{job.id}{FAILED}", {"exit_code": code, "error": why})
        bar.update(1)


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


def check_train_flags(runs: list[Run]) -> None:
    """Each cell's `rankwise train` arguments parsed as `rankwise train` parses them (types and ranges), so a bad
    setting (max_steps: -3) fails the dry run and the sweep before anything runs, naming the cell."""
    import contextlib
    import io

    from ..parsing import OneLineParser
    from ..training.commands import _add_train

    parser = OneLineParser(prog="rankwise")
    _add_train(parser.add_subparsers(dest="command"))
    seen = set()
    for run in runs:
        args = tuple(run.train_args())
        if args in seen:
            continue
        seen.add(args)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(["train", *args, "--out", "unused"])
        except SystemExit:
            why = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "invalid arguments"
            why = why.split("error: ", 1)[-1].split(" (see ")[0]
            raise RankwiseError(f"cell {run.id if not run.pending else run.label} ({run.task}, "
                                f"{run.budget_label}): {why}") from None


def format_dry_run(exp: Experiment, out: Path, tolerance: float = 0.02) -> str:
    """Every tuning and grid cell with its status, its budget and what it will spend (and whether within
    `tolerance` of the budget: an entry that cannot spend it is said here, before anything runs)."""
    from ..allocators import parse_budget

    from .skeleton import layers_of

    tuning, choices, _ = tuning_cells(exp, out) if exp.tune is not None else ([], {}, [])
    cells = [*tuning, *exp.runs(choices)]
    check_train_flags(cells)
    cache: dict = {}
    rows, unmet, by_task = [], [], {}
    for run in cells:
        layers = layers_of(run.settings["model"], run.settings.get("targets"))
        b = parse_budget(None if isinstance(run.budget, int) else run.budget, layers,
                         budget_rank=run.budget if isinstance(run.budget, int) else None,
                         total_params=_total(run))
        try:
            spent = planned_params(run, cache)
        except RankwiseError as e:
            spent, note = None, f"cannot: {str(e)[:60]}"
            unmet.append(f"{run.label} at {run.budget_label} on {run.task}: {e}")
        else:
            note = "" if spent is None else f"{(spent - b.params) / b.params:+.2%}"
            if spent is not None and abs(spent - b.params) > tolerance * b.params:
                unmet.append(f"{run.label} at {run.budget_label} on {run.task}: spends {spent:,} of {b.params:,}")
                note += f" (outside {tolerance:.0%})"
        status = "pending" if run.pending else "done" if is_finished(out / run.folder / run.id) else "todo"
        by_task.setdefault(run.task, {"done": 0, "todo": 0, "pending": 0})[status] += 1
        values = ",".join(f"{k}={v}" for k, v in run.candidate.items())
        rows.append((run.id if not run.pending else f"{run.task}-{run.label}-{run.budget_label}-s{run.seed}",
                     status, f"{b.params:,}", "n/a" if spent is None else f"{spent:,}", note or "-", run.phase,
                     values or ("tuned-later" if run.pending else "-")))
    head = ("run", "status", "budget", "lora params", "vs budget", "phase", "values")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(head, widths)).rstrip()]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    counts = {k: sum(c[k] for c in by_task.values()) for k in ("done", "todo", "pending")}
    lines.append(f"{len(cells)} runs: {counts['done']} finished, {counts['todo']} to run, {counts['pending']} "
                 "waiting for their tuning (n/a: known only after calibration/training; recorded in results.json)")
    if len(by_task) > 1:  # a long study: where each task stands
        lines.append("by task: " + "; ".join(f"{t} {c['done']} finished, {c['todo']} to run, {c['pending']} waiting"
                                              for t, c in by_task.items()))
    if exp.tune is not None and exp.tune.extend:
        lines.append("tune.extend: where a best value is the first or last tried, up to "
                     + ", ".join(f"{n} more {k}" for k, n in exp.tune.extend.items())
                     + " per end are added once the cells before them finish (not counted above)")
    if unmet:
        lines.append(f"{len(set(unmet))} entries cannot spend their budget within {tolerance:.0%} (the report will "
                     "not compare them): " + "; ".join(sorted(set(unmet))[:6]) + (" ..." if len(set(unmet)) > 6 else ""))
    return "\n".join(lines)


def _total(run: Run) -> int | None:
    if isinstance(run.budget, str) and run.budget.strip().endswith("%"):
        from .skeleton import model_params

        return model_params(run.settings["model"])
    return None
