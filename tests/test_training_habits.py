"""Trainer habits (issue 7, item 5): option checks, --config, --train-arg, cuda:N, stdout hygiene, gradient
accumulation, schedules, evaluation during training, TensorBoard logs, checkpoints and a SIGKILLed run resumed.

References are independent of the code under test: the same run with a doubled batch (accumulation), the schedule
formula written out by hand, and an uninterrupted run of the same seed (resume)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rankwise.training.checkpoints import MARKER, checkpoint_dir, last_checkpoint, open_checkpoints
from rankwise.training.options import TrainOptions, parse_train_args
from rankwise.training.prepare import pick_device
from rankwise.types import RankwiseError
from test_training_fixtures import _copy_tokenizer, sentences, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--rank", "2", "--batch-size", "4", "--max-length", "32", "--device", "cpu"]


@pytest.fixture
def still_bert(tmp_path, minilm):
    """A tiny BERT without dropout: runs are then deterministic functions of the data order and the batch."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                     vocab_size=30522, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    d = tmp_path / "still-bert"
    BertModel(cfg).save_pretrained(d)
    _copy_tokenizer(minilm, d)
    return d


@pytest.fixture
def data(tmp_path):
    rows = [{"sentence": t, "label": y} for t, y in sentences(24)]
    d = tmp_path / "bin"
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "validation.jsonl", rows[:8])
    return d


def _cli(argv, capsys):
    from rankwise.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ----- checks before any model loads --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(grad_accum=0), "--grad-accum must be an integer >= 1"),
    (dict(warmup_ratio=1.0), r"--warmup-ratio must be in \[0, 1\)"),
    (dict(warmup_ratio=float("nan")), "--warmup-ratio must be a finite number"),
    (dict(weight_decay=-0.1), "--weight-decay must be >= 0"),
    (dict(scheduler="cosine_annealing"), "unknown --scheduler 'cosine_annealing'"),
    (dict(bf16=True, fp16=True), "one of --bf16 and --fp16"),
    (dict(fp16=True), "--fp16 needs a CUDA GPU"),
    (dict(save_steps=0), "--save-steps must be an integer >= 1"),
    (dict(save_total_limit=2), "--save-total-limit needs --save-steps"),
    (dict(report_to=["tensorbored"]), "unknown --report-to 'tensorbored'"),
    (dict(report_to=["none", "tensorboard"]), "none cannot be combined"),
    (dict(train_args=["max_grad_norm"]), "expects KEY=VALUE"),
    (dict(train_args=["max_grad_nrom=1"]), "max_grad_nrom: not a TrainingArguments field"),
    (dict(train_args=["learning_rate=1e-3"]), "learning_rate: set it with --lr"),
    (dict(train_args=["label_names=[\"y\"]"]), "rankwise sets this field itself"),
    (dict(train_args=["max_grad_norm=abc"]), "max_grad_norm=abc: expected float"),
    (dict(train_args=["max_grad_norm=NaN"]), "max_grad_norm=NaN: expected float"),
    (dict(train_args=["gradient_checkpointing=3"]), "expected bool"),
])
def test_option_errors_are_one_line(kwargs, match):
    with pytest.raises(RankwiseError, match=match) as e:
        TrainOptions(**kwargs).check("cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,package", [("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_report_to_needs_its_package(name, package):
    import importlib.util

    installed = importlib.util.find_spec(package) is not None or (
        name == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None)
    if installed:
        assert TrainOptions(report_to=[name]).check("cpu").report_to == [name]
    else:
        with pytest.raises(RankwiseError, match=f"needs the {package} package.*pip install {package}"):
            TrainOptions(report_to=[name]).check("cpu")


def test_train_args_are_typed_and_reach_trainer(still_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rankwise.training.prepare import make_trainer

    parsed = parse_train_args(["max_grad_norm=0.5", "optim=adafactor", "gradient_checkpointing=true",
                               "hub_model_id=123", "logging_first_step=false"])
    assert parsed == {"max_grad_norm": 0.5, "optim": "adafactor", "gradient_checkpointing": True,
                      "hub_model_id": "123", "logging_first_step": False}
    opts = TrainOptions(grad_accum=3, warmup_ratio=0.2, weight_decay=0.01, scheduler="cosine", bf16=True,
                        save_steps=5, save_total_limit=2, eval_steps=4,
                        train_args=["max_grad_norm=0.5", "adam_beta2=0.99"]).check("cpu")
    model = AutoModelForSequenceClassification.from_pretrained(still_bert, num_labels=2)
    trainer = make_trainer(model, AutoTokenizer.from_pretrained(still_bert), "seq-cls", "class", out_dir="unused",
                           eval_ds=[0], device="cpu", progress=False, options=opts)
    a = trainer.args
    got = (a.gradient_accumulation_steps, a.warmup_steps, a.weight_decay, a.lr_scheduler_type, a.bf16,
           a.save_strategy, a.save_steps, a.save_total_limit, a.eval_strategy, a.eval_steps, a.max_grad_norm,
           a.adam_beta2, a.report_to)
    assert got == (3, 0.2, 0.01, "cosine", True, "steps", 5, 2, "steps", 4, 0.5, 0.99, [])


def test_pick_device_cuda_n(monkeypatch):
    with pytest.raises(RankwiseError, match="auto, cpu, cuda or cuda:N"):
        pick_device("gpu1")
    with pytest.raises(RankwiseError, match="auto, cpu, cuda or cuda:N"):
        pick_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(RankwiseError, match="no CUDA GPU is visible"):
            pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == "cuda:1"
    with pytest.raises(RankwiseError, match=r"only 2 GPU\(s\) visible \(cuda:0..cuda:1\)"):
        pick_device("cuda:2")



@pytest.mark.parametrize("argv", [["eval", "RUN", "--data", "d.csv"], ["predict", "RUN", "--text", "hi"],
                                  ["predict", "--adapters", "a=RUN", "--text", "hi"]])
def test_eval_and_predict_take_cuda_n(argv, monkeypatch, capsys):
    """--device cuda:N reaches the same check as train's (the parser no longer limits it to auto/cpu/cuda)."""
    import rankwise.training.runs as runs
    from rankwise.cli import main

    seen = []

    def fake_pick(device):
        seen.append(device)
        raise RankwiseError("stop here")

    monkeypatch.setattr(runs, "pick_device", fake_pick)
    monkeypatch.setattr("rankwise.training.prepare.pick_device", fake_pick)
    assert main([*argv, "--device", "cuda:3"]) != 0
    assert seen == ["cuda:3"] and "stop here" in capsys.readouterr().err

# ----- --config ----------------------------------------------------------------------------------------------
def _parse(argv):
    from rankwise.cli import build_parser

    return build_parser().parse_args(argv)


def test_config_fills_in_flags_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: minilm\ndata: some/folder\nepochs: 3\nmax-train-samples: 1000\n"
                   "text_columns: [premise, hypothesis]\nbf16: true\nset: {scaling: sqrt, floor: 2}\n"
                   "train_arg: {max_grad_norm: 0.5}\nreport_to: none\nsave_steps: 20\n")
    args = _parse(["train", "--config", str(cfg), "--epochs", "1", "--set", "floor=4"])
    assert (args.model_opt, args.data, args.epochs, args.max_train_samples) == ("minilm", "some/folder", 1.0, 1000)
    assert args.text_columns == ["premise,hypothesis"] and args.bf16 and args.save_steps == 20
    assert args.set == ["scaling=sqrt", "floor=2", "floor=4"] and args.train_arg == ["max_grad_norm=0.5"]
    from rankwise.parsing import parse_set

    assert parse_set(args.set) == {"scaling": "sqrt", "floor": 4}  # the command line's value wins
    positional = _parse(["train", "tiny", "--config", str(cfg)])
    assert positional.model == "tiny" and positional.model_opt is None


@pytest.mark.parametrize("text,match", [
    ("epochz: 3\n", "unknown key 'epochz'"),
    ("- epochs\n", "must be a mapping"),
    ("epochs: [\n", "not valid YAML"),
    ("dora: 3\n", "is a switch"),
    ("epochs: abc\n", "argument --epochs"),
])
def test_config_errors_are_one_line_exit_2(tmp_path, capsys, text, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        _parse(["train", "minilm", "--data", "x", "--config", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and re.search(match, err)


# ----- training behaviour ---------------------------------------------------------------------------------------
def _curve(run: Path) -> list[float]:
    return [p["loss"] for p in json.loads((run / "results.json").read_text())["train_info"]["loss_curve"]]


def test_grad_accum_equals_the_doubled_batch_and_stdout_is_json(tmp_path, still_bert, data, capsys):
    """4 x 2 accumulated batches step exactly like one batch of 8 (same examples, a plain mean loss). Without -q
    the progress and Trainer's loss dicts go to stderr: stdout parses as one JSON document."""
    common = ["train", str(still_bert), "--data", str(data), *TINY, "--epochs", "1", "--lr", "1e-2"]
    rc, out, err = _cli([*common, "--grad-accum", "2", "--out", str(tmp_path / "ga")], capsys)
    assert rc == 0, err
    assert json.loads(out)["out"] == str(tmp_path / "ga") and "'loss'" in err
    rc, out, err = _cli([*common[:-2], "--batch-size", "8", "--epochs", "1", "--lr", "1e-2", "--out",
                         str(tmp_path / "b8"), "-q"], capsys)
    assert rc == 0, err
    ga, b8 = _curve(tmp_path / "ga"), _curve(tmp_path / "b8")
    assert len(ga) == 3 == len(b8)  # 24 examples / 8 per optimizer step
    assert ga == pytest.approx(b8, abs=1e-5) and abs(ga[0] - math.log(2)) < 0.1  # a mean, not 2 x the mean
    hp = json.loads((tmp_path / "ga" / "results.json").read_text())["run_info"]["hparams"]
    assert hp["grad_accum"] == 2 and hp["warmup_ratio"] == 0.06 and hp["scheduler"] == "linear"


def test_cosine_warmup_schedule_and_eval_steps(tmp_path, still_bert, data, capsys):
    """lr at step t (hand formula): warm-up over w = ceil(0.25 T) steps, then half a cosine to 0."""
    rc, out, err = _cli(["train", str(still_bert), "--data", str(data), *TINY, "--max-steps", "8", "--lr", "1e-2",
                         "--scheduler", "cosine", "--warmup-ratio", "0.25", "--weight-decay", "0.01",
                         "--eval-steps", "3", "--train-arg", "logging_steps=1", "--out", str(tmp_path / "cos"),
                         "-q"], capsys)
    assert rc == 0, err
    info = json.loads((tmp_path / "cos" / "results.json").read_text())
    total, warm = 8, math.ceil(8 * 0.25)

    def lr(step):  # the rate optimizer step `step` (1-based) uses: the schedule after step - 1 updates
        t = step - 1
        return 1e-2 * t / warm if t < warm else 1e-2 * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))

    curve = info["train_info"]["lr_curve"]
    assert [p["step"] for p in curve] == list(range(1, total + 1))
    assert [p["lr"] for p in curve] == pytest.approx([lr(s) for s in range(1, total + 1)], rel=1e-6, abs=1e-12)
    evals = info["train_info"]["eval_curve"]
    assert [e["step"] for e in evals] == [3, 6, 8] and "eval_accuracy" in evals[0]
    hp = info["run_info"]["hparams"]
    assert hp["weight_decay"] == 0.01 and hp["train_args"] == {"logging_steps": 1} and hp["eval_steps"] == 3


def test_tensorboard_logs_land_in_the_run_folder(tmp_path, still_bert, data, capsys):
    rc, out, err = _cli(["train", str(still_bert), "--data", str(data), *TINY, "--max-steps", "2",
                         "--report-to", "tensorboard", "--out", str(tmp_path / "tb"), "-q"], capsys)
    assert rc == 0, err
    events = list((tmp_path / "tb" / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert not checkpoint_dir(tmp_path / "tb").exists() and not (tmp_path / "tb" / "trainer").exists()


# ----- checkpoints and resume -------------------------------------------------------------------------------------
def test_checkpoint_folder_rules(tmp_path):
    out = tmp_path / "run"
    folder = checkpoint_dir(out)
    assert folder == tmp_path / ".run.checkpoints"
    assert open_checkpoints(out, {"lr": 1}, resume=False, overwrite=False) is None and (folder / MARKER).is_file()
    # killed before the first checkpoint: a fresh start may simply begin again
    assert open_checkpoints(out, {"lr": 1}, resume=False, overwrite=False) is None
    for step in (2, 4, 6):
        (folder / f"checkpoint-{step}").mkdir()
    (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-6" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    assert last_checkpoint(folder) == folder / "checkpoint-4"
    with pytest.raises(RankwiseError, match="interrupted run.*--resume.*--overwrite"):
        open_checkpoints(out, {"lr": 1}, resume=False, overwrite=False)
    with pytest.raises(RankwiseError, match=r"other settings \(lr=1 then, 2 now\)"):
        open_checkpoints(out, {"lr": 2}, resume=True, overwrite=False)
    assert open_checkpoints(out, {"lr": 1, "save_steps": 9}, resume=True, overwrite=False) == \
        folder / "checkpoint-4"  # how often it saves does not change the weights
    assert open_checkpoints(out, {"lr": 2}, resume=False, overwrite=True) is None
    assert last_checkpoint(folder) is None
    with pytest.raises(RankwiseError, match="no complete checkpoint"):
        open_checkpoints(out, {"lr": 2}, resume=True, overwrite=False)
    with pytest.raises(RankwiseError, match="no checkpoints of an earlier run"):
        open_checkpoints(tmp_path / "other", {}, resume=True, overwrite=False)


_KILLER = """
import os, signal, sys
import transformers

kill_at = int(os.environ["KILL_AT"])
step = transformers.Trainer.training_step

def training_step(self, *args, **kwargs):  # SIGKILL this process once `kill_at` optimizer steps are done
    if self.state.global_step >= kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)

transformers.Trainer.training_step = training_step
from rankwise.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, minilm, data, capsys):
    """SIGKILL after step 5 (checkpoints at 3 and 6 of 8 planned): --resume continues from checkpoint-3 and ends
    with the same adapter weights, loss curve, train_loss and metrics as an uninterrupted run of the same seed.
    The tiny BERT keeps its dropout: the resume must restore the RNG state too."""
    from safetensors.torch import load_file

    from test_training_fixtures import save_tiny_bert

    model = save_tiny_bert(tmp_path / "tiny-bert", minilm)
    args = ["train", str(model), "--data", str(data), *TINY, "--max-steps", "8", "--save-steps", "3", "--lr",
            "1e-2", "--seed", "3", "-q"]
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    env = dict(os.environ, KILL_AT="5", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = subprocess.run([sys.executable, str(script), *args, "--out", str(tmp_path / "k")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = checkpoint_dir(tmp_path / "k")
    assert not (tmp_path / "k").exists() and last_checkpoint(folder) == folder / "checkpoint-3"

    rc, out, err = _cli([*args, "--out", str(tmp_path / "k"), "--resume"], capsys)
    assert rc == 0, err
    rc, out, err = _cli([*args, "--out", str(tmp_path / "u")], capsys)
    assert rc == 0, err
    k, u = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("k", "u"))
    assert k["train_info"]["resumed_from_step"] == 3 and u["train_info"]["resumed_from_step"] is None
    assert k["train_info"]["steps"] == 8 and len(k["train_info"]["loss_curve"]) == 8
    assert _curve(tmp_path / "k") == pytest.approx(_curve(tmp_path / "u"), abs=1e-6)
    assert k["train_info"]["train_loss"] == pytest.approx(u["train_info"]["train_loss"], abs=1e-6)
    assert k["eval"] == pytest.approx(u["eval"], abs=1e-6)
    wk, wu = (load_file(tmp_path / r / "adapter_model.safetensors") for r in ("k", "u"))
    assert wk.keys() == wu.keys() and all(torch.allclose(wk[n], wu[n], atol=1e-6) for n in wk)
    assert not folder.exists() and not list(tmp_path.glob(".k.partial-*"))  # spent checkpoints, swept temp


# accelerate's --multi_gpu launcher is torch.distributed.run underneath; without a GPU it runs gloo like torchrun
LAUNCHERS = {"torchrun": ["torchrun", "--nproc-per-node", "2", "--master-port", "29531"],
             "accelerate": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]}


@pytest.mark.slow  # two processes: about 30 s on 2 idle cores
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_data_parallel_two_cpu_processes(launcher, tmp_path, still_bert, data, capsys):
    """torchrun --nproc-per-node 2 and accelerate launch (gloo on CPU): each process takes half of every global
    batch of 2 x 4, so the run steps exactly like one process with batches of 8; one run folder, one JSON summary
    on stdout."""
    exe, *args = LAUNCHERS[launcher]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = ["train", str(still_bert), "--data", str(data), *TINY, "--epochs", "1", "--lr", "1e-2", "-q"]
    proc = subprocess.run([str(Path(sys.executable).parent / exe), *args, "-m", "rankwise", *common,
                           "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["out"] == str(tmp_path / "ddp")  # rank 0 alone printed
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".ddp", "ddp"))) == ["ddp"]
    rc, out, err = _cli([*common[:-1], "--batch-size", "8", "--out", str(tmp_path / "one")], capsys)
    assert rc == 0, err
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert ddp["train_info"]["world_size"] == 2 and ddp["train_info"]["steps"] == 3
    assert _curve(tmp_path / "ddp") == pytest.approx(_curve(tmp_path / "one"), abs=1e-5)
