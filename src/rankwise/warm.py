"""Warm workers: a sweep's runs start from a process that imported torch, transformers and peft once.

A cold run (`python -m rankwise train ...`) spends seconds importing the libraries before it reads a byte of
data; a sweep of hundreds of short runs pays that hundreds of times. Here one fork server per sweep (or per Ray
worker) imports them once (`multiprocessing`'s forkserver with this module preloaded), and every run is a fresh
child forked from it, so what per-process runs give is kept:

- a run that crashes, leaks memory or is killed takes only itself down (its own process, its own exit code);
- it starts from the same state as a cold run: nothing trained or seeded before the fork, the same thread count
  (`OMP_NUM_THREADS`, applied with `torch.set_num_threads` in the child), the same `sys.argv` for results.json;
- it dies with its parent: the child asks for SIGKILL when the fork server exits, and the fork server asks for
  SIGKILL when the sweep's main thread does (rankwise._warm_server), so no orphan finishes a run and races a
  resumed sweep.

The fork server is a fresh interpreter started with exec (not a fork of the sweep, which runs threads), so it is
safe under the threaded local pool and inside Ray workers. `RANKWISE_COLD_RUNS=1` (or `sweep --cold`) runs each
cell as its own `python -m rankwise train` process instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["start", "warm_context", "PRELOAD"]

# What the fork server imports once (rankwise.training.run pulls transformers' Trainer, peft, datasets); the CLI
# itself is light (lazy imports) and is imported by each run.
PRELOAD = ["torch", "transformers", "peft", "datasets", "rankwise.training.run",
           "rankwise.allocators", "rankwise.methods", "rankwise.dynamic.method", "rankwise.tuners.multirank"]

_CONTEXT = None


def warm_context(env: dict):
    """The forkserver context, started on first use with `env` in its environment (read at import time by some
    libraries, e.g. HF_HUB_OFFLINE by huggingface_hub: it must be set before the preload imports)."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing as mp

        os.environ.update(env)  # the fork server inherits this process's environment when it starts
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([*PRELOAD, "rankwise.warm", "rankwise._warm_server"])
        # start it now, from the calling thread: the kernel's parent-death signal fires when the thread that
        # started the server ends, so this must be a thread that lives as long as the sweep (its main thread)
        from multiprocessing import forkserver

        forkserver.ensure_running()
        _CONTEXT = ctx
    return _CONTEXT


def start(argv: list, log: str, env: dict) -> None:  # pragma: no cover - runs in the forked child
    """Child body: `rankwise ARGV` with stdout and stderr in `log`; exits with the command's exit code."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG: die with the server
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    code = 1
    try:
        # tqdm's default write lock holds a multiprocessing semaphore, made on a run's first progress bar; the
        # child ends with os._exit, which skips its cleanup, so each run left one for the resource tracker to
        # warn about when the sweep ends. A run writes only its own log: a thread lock is all it needs.
        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())
        threads = env.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        import runpy

        # exactly what `python -m rankwise ARGV` runs (rankwise/__main__.py), from the preloaded modules; the
        # command line lands in results.json as a cold run's does
        sys.argv = [sys.argv[0], *argv]
        runpy.run_module("rankwise", run_name="__main__", alter_sys=False)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - as an uncaught exception ends a cold run: traceback, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))

