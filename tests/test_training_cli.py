"""`rankwise train | eval | merge | predict` end to end on a tiny saved model, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from rankwise.cli import main
from test_training_fixtures import sentences, tiny_bert_dir, tiny_llama_dir, write_csv, write_jsonl  # noqa: F401


@pytest.fixture
def csv_data(tmp_path):
    return write_csv(tmp_path / "tiny.csv", ["text", "label"], [[t, y] for t, y in sentences(24)])


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_eval_merge_predict(tmp_path, tiny_bert_dir, csv_data, capsys):
    run = tmp_path / "run"
    code, out, err = _run(["train", tiny_bert_dir, "--data", csv_data, "--max-steps", 2, "--batch-size", 4,
                           "--rank", 2, "--targets", "query,value", "--out", run, "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads(out)["out"] == str(run)
    results = json.loads((run / "results.json").read_text())
    assert results["run_info"]["command"].startswith("rankwise ")
    assert results["run_info"]["adapter"]["source"] == "rank"

    code, out, err = _run(["eval", run, "--data", csv_data, "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads(out)["num_samples"] == 24

    code, _, err = _run(["merge", run, "--out", tmp_path / "merged", "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()

    code, out, err = _run(["predict", run, "--text", "good movie", "--text", "bad plot", "--device", "cpu"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and {"text", "label", "score"} <= set(rows[0])


def test_cli_strategy_inline_plan(tmp_path, tiny_bert_dir, csv_data, capsys):
    run = tmp_path / "run"
    code, _, err = _run(["train", "--model", tiny_bert_dir, "--data", csv_data, "--strategy", "uniform",
                         "--budget-rank", 2, "--max-steps", 1, "--out", run, "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    plan = json.loads((run / "plan.json").read_text())
    assert plan["strategy"] == "uniform" and plan["spent"] > 0


@pytest.mark.parametrize("argv,match", [
    (["train", "/no/such/model", "--data", "{csv}"], "model path /no/such/model does not exist"),
    (["train", "{model}", "--data", "{tmp}/missing.jsonl"], "does not exist"),
    (["train", "{model}", "--data", "{empty}"], "is empty"),
    (["train", "{model}", "--data", "{csv}", "--label-column", "nope"], "unknown column 'nope'"),
    (["train", "{model}", "--data", "{mixed}"], "mixes numbers"),
    (["train", "{model}", "--data", "{csv}", "--plan", "{tmp}/noplan"], "no plan at"),
    (["train", "{model}", "--data", "{csv}", "--budget", "10k"], "need --strategy"),
    (["eval", "{tmp}", "--data", "{csv}"], "not a rankwise run folder"),
])
def test_cli_bad_input_is_one_line(tmp_path, tiny_bert_dir, csv_data, capsys, argv, match):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    mixed = write_csv(tmp_path / "mixed.csv", ["text", "label"], [["a", "1"], ["b", "pos"], ["c", "0"], ["d", "neg"]])
    fill = {"{csv}": csv_data, "{model}": tiny_bert_dir, "{tmp}": tmp_path, "{empty}": empty, "{mixed}": mixed}
    args = []
    for a in argv:
        for k, v in fill.items():
            a = a.replace(k, str(v))
        args.append(a)
    code, _, err = _run(args + ["--out" if args[0] == "train" else "--device", tmp_path / "o" if args[0] == "train"
                                else "cpu"], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("rankwise ")]
    assert len(lines) == 1 and match in lines[0], err


def test_cli_preset_unmapped_architecture(tmp_path, csv_data, capsys, minilm):
    from transformers import DistilBertConfig, DistilBertModel

    from test_training_fixtures import _copy_tokenizer

    d = tmp_path / "distil"
    DistilBertModel(DistilBertConfig(n_layers=1, dim=32, hidden_dim=64, n_heads=2, vocab_size=30522)).save_pretrained(d)
    _copy_tokenizer(minilm, d)
    code, _, err = _run(["train", d, "--data", csv_data, "--preset", "efficient", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "no mapping for model type 'distilbert'" in err


def test_cli_causal_lm_predict_generates(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Say {w}", "input": "", "output": w}
                                                   for w, _ in sentences(12)])
    run = tmp_path / "run"
    code, out, err = _run(["train", tiny_llama_dir, "--data", data, "--max-steps", 1, "--max-length", 96,
                           "--out", run, "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "eval_loss_before" in json.loads(out)["eval"]
    code, out, err = _run(["predict", run, "--text", "Say hi", "--max-new-tokens", 2, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "output" in json.loads(out.splitlines()[-1])
