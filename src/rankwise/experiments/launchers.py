"""Where a sweep's runs execute: a local pool of `rankwise train` processes, or Ray tasks on an existing cluster.

Both run the same thing, `execute_run`: one `python -m rankwise train ... --out RUN_DIR -q` subprocess with its
output in a log file. The child is tied to its parent (Linux PR_SET_PDEATHSIG), so a sweep (or Ray worker) that
is killed, even with SIGKILL, takes its trainings with it instead of leaving orphans that finish later and race
the resumed sweep. No scheduling of our own beyond the local pool: Ray places tasks by num_cpus/num_gpus.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..types import RankwiseError

__all__ = ["Job", "LocalLauncher", "RayLauncher", "execute_run", "make_launcher", "forwarded_env"]

# Environment a run needs on whichever node runs it (never the whole driver environment: PATH differs per node).
_FORWARD = ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "RANKWISE_CACHE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "RANKWISE_COLD_RUNS")


@dataclass(frozen=True)
class Job:
    """One run to execute: `rankwise train` arguments (without --out), its run folder and log file."""

    id: str
    args: tuple
    out: str
    log: str


def forwarded_env(threads: int | None = None) -> dict:
    env = {k: os.environ[k] for k in _FORWARD if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    if threads and "OMP_NUM_THREADS" not in os.environ:  # N runs side by side must not each take every core
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class _Child:
    """A warm run's process with the part of Popen's interface the launchers use."""

    def __init__(self, process):
        self.p = process

    def poll(self):
        return self.p.exitcode

    def wait(self, timeout=None):
        self.p.join(timeout)
        if self.p.exitcode is None:
            raise subprocess.TimeoutExpired("rankwise train", timeout)
        return self.p.exitcode

    def terminate(self):
        self.p.terminate()

    def kill(self):
        self.p.kill()


def warm_runs() -> bool:
    """Runs start from a warm fork server unless RANKWISE_COLD_RUNS=1 (rankwise.warm)."""
    return os.environ.get("RANKWISE_COLD_RUNS", "") in ("", "0")


def execute_run(args, out: str, log: str, env: dict, registry: "dict | None" = None, key: str = "",
                warm: bool | None = None) -> int:
    """Run one training to completion; returns its exit code. Runs in the sweep (local) or on a Ray worker:
    forked from a warm fork server (imports paid once per sweep or Ray worker), or as a cold subprocess."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    argv = ["train", *map(str, args), "--out", str(out), "-q"]
    cmd = [sys.executable, "-m", "rankwise", *argv]
    warm = warm_runs() if warm is None else warm
    with open(log, "w") as fh:
        fh.write(("$ (warm) " if warm else "$ ") + " ".join(cmd) + "\n")
        fh.flush()
        if warm:
            from ..warm import start, warm_context

            proc = warm_context(env).Process(target=start, args=(argv, log, env), daemon=False)
            proc.start()
            child = _Child(proc)
            if registry is not None:
                registry[key] = child
            try:
                return child.wait()
            finally:
                if registry is not None:
                    registry.pop(key, None)
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, preexec_fn=_die_with_parent)
        if registry is not None:
            registry[key] = proc
        try:
            return proc.wait()
        finally:
            if registry is not None:
                registry.pop(key, None)


class LocalLauncher:
    """Up to `jobs` runs at a time on this machine, each in its own process."""

    name = "local"

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise RankwiseError(f"--jobs must be >= 1, got {jobs}")
        self.jobs = jobs
        self._procs: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()

    def warm_up(self) -> dict:
        """Start the fork server (rankwise.warm) if runs are warm; returns the runs' environment. The sweep calls
        it first, from its main thread (the fork server dies with the thread that started it), so the server's
        imports overlap the sweep's own checks instead of delaying the first run; later calls do nothing."""
        env = forwarded_env(max(1, (os.cpu_count() or 1) // self.jobs))
        if warm_runs():
            from ..warm import warm_context

            warm_context(env)
        return env

    def _one(self, job: Job, env: dict, on_start) -> int | None:
        if self._stop.is_set():
            return None
        on_start(job)
        return execute_run(job.args, job.out, job.log, env, self._procs, job.id)

    def run(self, jobs: list[Job], on_start: Callable[[Job], None]) -> Iterator[tuple[Job, int | None]]:
        """Yield (job, exit code) as runs finish. On interruption every running child is stopped."""
        env = self.warm_up()
        self._stop.clear()  # a sweep calls run() once per phase (tuning, then the grid)
        pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="rankwise-run")
        futures = {pool.submit(self._one, j, env, on_start): j for j in jobs}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for f in done:
                    yield futures[f], f.result()
        finally:
            self._stop.set()
            self.terminate()
            pool.shutdown(wait=True, cancel_futures=True)

    def terminate(self) -> None:
        procs = list(self._procs.values())
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


class RayLauncher:
    """Each run is a Ray task with `num_cpus`/`num_gpus`; run folders must be on storage every node sees."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
                 jobs: int | None = None):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise RankwiseError("--launcher ray needs Ray: pip install 'rankwise[ray]'") from None
        self.address, self.num_cpus, self.num_gpus, self.jobs = address, num_cpus, num_gpus, jobs

    def run(self, jobs: list[Job], on_start: Callable[[Job], None]) -> Iterator[tuple[Job, int | None]]:
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            if self.address is None:
                # A local instance's workers run at niceness 15 by default (Ray treats them as background work);
                # here they are the work, and at 15 any other process on the machine starves the trainings.
                os.environ.setdefault("RAY_worker_niceness", "0")
            # address None starts a local instance; "auto" or host:port joins an existing cluster
            ray.init(address=self.address, log_to_driver=False, include_dashboard=False)
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)(execute_run)
        env = forwarded_env(int(self.num_cpus) if self.num_cpus >= 1 else 1)
        queue, refs = list(jobs), {}
        limit = self.jobs or len(jobs) or 1
        try:
            while queue or refs:
                while queue and len(refs) < limit:
                    job = queue.pop(0)
                    on_start(job)
                    refs[remote.remote(list(job.args), job.out, job.log, env)] = job
                done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
                for ref in done:
                    job = refs.pop(ref)
                    try:
                        code = ray.get(ref)
                    except ray.exceptions.RayError as e:  # the worker died: report as a failed run
                        Path(job.log).parent.mkdir(parents=True, exist_ok=True)
                        with open(job.log, "a") as fh:
                            fh.write(f"ray task failed: {str(e).splitlines()[0]}\n")
                        code = -1
                    yield job, code
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()


def make_launcher(kind: str, *, jobs: int | None, address: str | None, resources: dict):
    if kind == "local":
        if address:
            raise RankwiseError("--address goes with --launcher ray")
        return LocalLauncher(jobs or 1)
    if kind == "ray":
        return RayLauncher(address, float(resources.get("num_cpus", 1)), float(resources.get("num_gpus", 0)), jobs)
    raise RankwiseError(f"unknown launcher {kind!r}; use local or ray")
