"""CLI smoke tests: in-process through rankwise.cli.main (fast), plus one real subprocess for the entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rankwise.allocators import list_allocators
from rankwise.cli import main

STRATEGIES = [s.name for s in list_allocators()]
# `discovered` plans from a trained run (plan --from-run RUN_DIR), tested in tests/test_multirank.py
# discovered needs a trained run; activation/gradient/eva need --data (their plans: tests/test_calibration.py)
MODEL_STRATEGIES = [s for s in STRATEGIES if s != "discovered" and s not in ("activation", "gradient", "eva")]


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed (e.g. save_pretrained progress)
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_entry_point_help_lists_commands():
    exe = Path(sys.executable).parent / "rankwise"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for cmd in ("analyze", "strategies", "plan"):
        assert cmd in proc.stdout


@pytest.mark.parametrize("cmd", ["analyze", "plan", "strategies"])
def test_every_command_has_help(cmd, capsys):
    assert main([cmd, "--help"]) == 0  # main returns the exit code, --help included
    assert "usage: rankwise " + cmd in capsys.readouterr().out


def test_strategies(capsys):
    code, out, _ = run(capsys, "strategies")
    assert code == 0 and [line.split()[0] for line in out.strip().splitlines()] == STRATEGIES
    code, out, _ = run(capsys, "strategies", "--format", "json")
    assert {d["name"] for d in json.loads(out)} == set(STRATEGIES)


def test_analyze_json(capsys, bert_dir, tmp_path):
    code, _, _ = run(capsys, "analyze", bert_dir, "--format", "json", "--out", tmp_path / "a.json", "-q")
    rows = json.loads((tmp_path / "a.json").read_text())
    assert code == 0 and len(rows) == 12
    for key in ("name", "shape", "alpha_hill", "alpha", "num_spikes", "spectral_norm", "stable_rank"):
        assert key in rows[0]
    assert rows[0]["shape"] == [32, 32]
    code, out, _ = run(capsys, "analyze", bert_dir, "--format", "csv", "--targets", "query", "-q")
    assert code == 0 and len(out.strip().splitlines()) == 3


@pytest.mark.parametrize("strategy", MODEL_STRATEGIES)
def test_plan_round_trip_through_plain_peft(capsys, bert_dir, tmp_path, strategy):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    out = tmp_path / "plan"
    code, text, _ = run(capsys, "plan", bert_dir, "--strategy", strategy, "--budget", "3k", "--out", out, "-q")
    assert code == 0 and "spent=" in text
    plan = json.loads((out / "plan.json").read_text())
    model = get_peft_model(AutoModel.from_pretrained(bert_dir), LoraConfig.from_pretrained(str(out)))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    step = min(r["shape"][0] + r["shape"][1] for r in plan["layers"] if r["rank"] > 0)
    assert 3000 - step < lora == plan["spent"] <= 3000
    real = {n.removeprefix("base_model.model."): m.r["default"] for n, m in model.named_modules() if hasattr(m, "r")
            and isinstance(getattr(m, "r"), dict)}
    assert real == {r["name"]: r["rank"] for r in plan["layers"] if r["rank"] > 0}


def test_plan_plot_and_options(capsys, bert_dir, tmp_path):
    png = tmp_path / "ranks.png"
    code, out, _ = run(capsys, "plan", bert_dir, "-s", "spectral", "--budget-rank", "4", "--plot", png,
                       "--set", "scaling=sqrt", "--rank-step", "2", "--format", "json", "-q")
    assert code == 0 and png.stat().st_size > 1000
    plan = json.loads(out)
    assert plan["hparams"]["scaling"] == "sqrt" and all(r["rank"] % 2 == 0 for r in plan["layers"])


@pytest.mark.parametrize("argv,needle", [
    (["plan", "{m}", "-s", "nope", "--budget", "1k"], "unknown strategy"),
    (["plan", "{m}", "-s", "uniform"], "exactly one of --budget"),
    (["plan", "{m}", "-s", "uniform", "--budget", "12 apples"], "cannot read budget"),
    (["plan", "{m}", "-s", "uniform", "--budget", "10"], "uniform needs rank 1 on each"),
    (["plan", "{m}", "-s", "uniform", "--budget", "1k", "--targets", "q_proj"], "match no adaptable"),
    (["plan", "{m}", "-s", "spectral", "--budget", "1k", "--set", "bogus=1"], "no option bogus"),
    (["analyze", "/no/such/model"], "/no/such/model"),
])
def test_bad_usage_exits_2_with_one_line(capsys, bert_dir, argv, needle):
    code, out, err = run(capsys, *[a.format(m=bert_dir) for a in argv], "-q")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_argparse_errors_exit_2(capsys):
    assert main(["plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rankwise plan: error: ")


@pytest.mark.parametrize("strategy", MODEL_STRATEGIES)
def test_minilm_300k_every_strategy(capsys, minilm, tmp_path, strategy):
    """The issue's acceptance check on the real MiniLM: LoRA parameters in [300k - one step, 300k], ranks as planned."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    out = tmp_path / strategy
    code, _, _ = run(capsys, "plan", minilm, "--strategy", strategy, "--budget", "300k", "--out", out, "-q")
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    model = get_peft_model(AutoModel.from_pretrained(minilm), LoraConfig.from_pretrained(str(out)))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert 300_000 - 768 < lora <= 300_000 and lora == plan["spent"]
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "r", None), dict):
            row = next(r for r in plan["layers"] if name.endswith(r["name"]))
            assert mod.r["default"] == row["rank"] and mod.lora_alpha["default"] == row["alpha"]


def test_a_closed_pipe_ends_quietly():
    """`rankwise strategies --format json | head -0`: the reader is gone before the first write; no traceback, no
    error line, SIGPIPE's exit code (before the fix: "error: BrokenPipeError ...", exit 1)."""
    proc = subprocess.Popen([sys.executable, "-m", "rankwise", "strategies", "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the command imports for a few hundred ms before it writes: the pipe is closed by then
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err
