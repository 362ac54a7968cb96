"""Checked on load (issue 23, item 4): a run's base model is verified against its plan.json when the run is loaded,
by the rule training applies a plan with; task.json and results.json with fields of the wrong type are one line,
"corrupt FILE: field X must be ...", exit 2.

The swapped base models are built here by hand: same hidden sizes (so every layer shape matches) but one layer
fewer, or one more. Which layer is missing is known from the construction (encoder.layer.1), not from the code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rankwise.cli import main
from rankwise.types import RankwiseError
from test_training_fixtures import TOKENIZER_FILES, save_tiny_bert, sentences, write_jsonl


def _bert(dst: Path, tok: Path, layers: int, like: Path | None = None) -> Path:
    """A tiny BERT of the fixture's sizes with `layers` layers; `like`: copy that model's weights where they fit."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    model = BertModel(BertConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=2,
                                 intermediate_size=64, vocab_size=30522, max_position_embeddings=64))
    if like is not None:
        theirs = BertModel.from_pretrained(like).state_dict()
        model.load_state_dict({k: v for k, v in theirs.items() if k in model.state_dict()}, strict=False)
    model.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            shutil.copy(tok / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from conftest import minilm_path, missing

    tok = minilm_path()
    if tok is None:
        missing("MiniLM not installed (its tokenizer serves the tiny models): make install")
    root = tmp_path_factory.mktemp("load")
    base = save_tiny_bert(root / "base", tok)  # 2 layers
    data = write_jsonl(root / "d.jsonl", [{"text": t, "label": y} for t, y in sentences(24)])
    run = root / "run"
    code = main(["train", str(base), "--data", str(data), "--rank", "2", "--max-steps", "1", "--batch-size", "8",
                 "--max-length", "16", "--out", str(run), "-q", "--device", "cpu"])
    assert code == 0
    return {"root": root, "base": base, "tok": tok, "data": data, "run": run}


def _run_on(world, tmp_path: Path, base: Path) -> Path:
    """A copy of the trained run whose recorded base folder is `base` (as if the folder's model was replaced)."""
    run = shutil.copytree(world["run"], tmp_path / "run")
    task = json.loads((run / "task.json").read_text())
    task["base_model"] = task["base_model_path"] = str(base)
    (run / "task.json").write_text(json.dumps(task))
    return run


def _cli(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr without transformers' "Loading weights" progress lines, which predict shows)."""
    capsys.readouterr()  # what building the test's models printed
    code = main(argv)
    err = capsys.readouterr().err.replace("\r", "\n")
    return code, "\n".join(ln for ln in err.splitlines() if ln.strip() and not ln.startswith("Loading weights"))


def test_the_trained_base_loads_silently(world, capsys):
    code, err = _cli(["predict", str(world["run"]), "--text", "a great movie"], capsys)
    assert code == 0 and "warning" not in err, err


def test_base_with_fewer_layers_of_the_same_shapes_is_refused(world, tmp_path, capsys):
    run = _run_on(world, tmp_path, _bert(tmp_path / "short", world["tok"], layers=1, like=world["base"]))
    for argv in (["predict", str(run), "--text", "a great movie"],
                 ["eval", str(run), "--data", str(world["data"]), "-q"],
                 ["merge", str(run), "--out", str(tmp_path / "merged"), "-q"],
                 ["export", str(run), "--format", "merged", "--out", str(tmp_path / "exported"), "-q"],
                 ["predict", "--adapters", f"a={run}", "--text", "a great movie"]):
        code, err = _cli(argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1, (argv, err)
        assert "not the one" in err and "encoder.layer.1" in err, (argv, err)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "exported").exists()
    from rankwise.training.runs import load_run_model

    with pytest.raises(RankwiseError, match="not the one .* was trained on"):
        load_run_model(run)


def test_base_with_an_extra_layer_loads_with_a_warning(world, tmp_path, capsys):
    run = _run_on(world, tmp_path, _bert(tmp_path / "deep", world["tok"], layers=3, like=world["base"]))
    code, err = _cli(["predict", str(run), "--text", "a great movie"], capsys)
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "target layer(s) the plan does not list" in warnings[0], err


# ----- corrupt records --------------------------------------------------------------------------------------------
TASK_EDITS = [
    ({"task": 5}, "field task must be one of 'seq-cls', 'causal-lm'"),
    ({"max_length": "16"}, "field max_length must be a positive integer"),
    ({"data": ["table"]}, "field data must be an object"),
    ({"base_model_path": None}, "field base_model_path must be a string"),
    ({"data": {"kind": "table", "text_columns": "text"}}, "field data.text_columns must be a list"),
    ({"data": {"kind": "table", "id2label": {"zero": "neg"}}}, "field data.id2label must be"),
    ({"pair_encoding": 1}, "field pair_encoding must be"),
]


@pytest.mark.parametrize("edit, words", TASK_EDITS, ids=[w.split()[1] for _, w in TASK_EDITS])
def test_task_json_with_wrong_types(world, tmp_path, capsys, edit, words):
    run = shutil.copytree(world["run"], tmp_path / "run")
    task = json.loads((run / "task.json").read_text())
    (run / "task.json").write_text(json.dumps({**task, **edit}))
    for argv in (["predict", str(run), "--text", "hi"], ["eval", str(run), "--data", str(world["data"]), "-q"]):
        code, err = _cli(argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"corrupt {run / 'task.json'}: {words}" in err, err


@pytest.mark.parametrize("section, key, value, words", [
    ("eval", "eval_accuracy", "high", "field eval.eval_accuracy must be a number"),
    ("run_info", "budget", "r2", "field run_info.budget must be an object"),
    ("train_info", "wall_time_s", "fast", "field train_info.wall_time_s must be a non-negative number"),
])
def test_results_json_with_wrong_types(world, tmp_path, capsys, section, key, value, words):
    sweep = tmp_path / "sweep"
    run = shutil.copytree(world["run"], sweep / "runs" / "r1")
    assert main(["report", str(sweep), "--out", str(tmp_path / "ok"), "--no-figures"]) == 0  # as written: fine
    capsys.readouterr()
    results = json.loads((run / "results.json").read_text())
    results[section][key] = value
    (run / "results.json").write_text(json.dumps(results))
    code, err = _cli(["report", str(sweep), "--out", str(tmp_path / "rep"), "--no-figures"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"corrupt {run / 'results.json'}: {words}" in err, err
