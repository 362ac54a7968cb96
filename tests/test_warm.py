"""Warm workers (rankwise.warm): a run forked from the warm fork server equals the same run started cold.

Bit-identical adapter weights and identical metrics for the same cell run both ways; a crashing run takes only
itself down and reports its exit code; the fork server does not outlive its sweep.
"""

from __future__ import annotations

import json
import os

from safetensors.torch import load_file

from rankwise.experiments.launchers import execute_run, forwarded_env
from test_sweep import assets  # noqa: F401 (a fixture)


def _args(assets, seed=0):
    return [str(assets / "tiny-bert"), "--data", str(assets / "data"), "--seed", str(seed), "--max-steps", "3",
            "--batch-size", "8", "--max-length", "16", "--device", "cpu", "--strategy", "depth", "--budget-rank", "2"]


def test_warm_and_cold_runs_of_one_cell_are_bit_identical(tmp_path, assets):
    env = forwarded_env(1)
    outs = {}
    for how in ("cold", "warm", "warm-again"):
        out = tmp_path / how
        code = execute_run(_args(assets), str(out), str(tmp_path / f"{how}.log"), env, warm=how != "cold")
        assert code == 0, (tmp_path / f"{how}.log").read_text()[-2000:]
        outs[how] = out
    ref = load_file(str(outs["cold"] / "adapter_model.safetensors"))
    for how in ("warm", "warm-again"):
        got = load_file(str(outs[how] / "adapter_model.safetensors"))
        assert sorted(got) == sorted(ref)
        for k in ref:
            assert got[k].dtype == ref[k].dtype and got[k].equal(ref[k]), k  # bit for bit, not within a tolerance
        a, b = (json.loads((outs[x] / "results.json").read_text()) for x in ("cold", how))
        assert a["eval"] == b["eval"] and a["train_info"]["loss_curve"] == b["train_info"]["loss_curve"]
        assert a["run_info"]["command"].split()[:2] == b["run_info"]["command"].split()[:2] == ["rankwise", "train"]
    assert "(warm)" in (tmp_path / "warm.log").read_text().splitlines()[0]


def test_a_failing_warm_run_reports_its_exit_code_and_the_next_run_still_works(tmp_path, assets):
    env = forwarded_env(1)
    bad = _args(assets)[:-2] + ["--budget-rank", "0"]
    assert execute_run(bad, str(tmp_path / "bad"), str(tmp_path / "bad.log"), env, warm=True) == 2
    assert "budget" in (tmp_path / "bad.log").read_text()
    assert not (tmp_path / "bad").exists()
    assert execute_run(_args(assets, seed=1), str(tmp_path / "ok"), str(tmp_path / "ok.log"), env, warm=True) == 0
    assert (tmp_path / "ok" / "results.json").is_file()


def test_the_fork_server_holds_torch_before_any_run(tmp_path, assets):
    """The fork server (read from the kernel's map of its memory, not from rankwise) has torch's library loaded:
    its children start with the imports done."""
    from multiprocessing import forkserver

    env = forwarded_env(1)
    assert execute_run(_args(assets), str(tmp_path / "r"), str(tmp_path / "r.log"), env, warm=True) == 0
    pid = forkserver._forkserver._forkserver_pid
    assert pid and pid != os.getpid()
    maps = open(f"/proc/{pid}/maps").read()
    assert "libtorch_cpu" in maps


def test_a_warm_run_leaves_no_semaphore_for_the_resource_tracker(tmp_path, assets):
    """A warm child ends with os._exit, which skips multiprocessing's cleanup: a semaphore a run made (tqdm's
    default write lock did, on its first progress bar) stayed registered, and the resource tracker warned about
    one "leaked semaphore" per run when the sweep ended. In a fresh interpreter, as a sweep is, two warm runs and
    then the exit: its stderr (where the tracker writes) has no such warning."""
    import subprocess
    import sys

    code = ("import sys; from rankwise.experiments.launchers import execute_run, forwarded_env; "
            "args, out = sys.argv[1:-1], sys.argv[-1]; "
            "codes = [execute_run(args, f'{out}/r{i}', f'{out}/r{i}.log', forwarded_env(1), warm=True) "
            "for i in (0, 1)]; assert codes == [0, 0], codes")
    proc = subprocess.run([sys.executable, "-c", code, *_args(assets), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "r1" / "results.json").is_file()
    assert "leaked semaphore" not in proc.stderr, proc.stderr[-2000:]
