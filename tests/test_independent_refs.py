"""`rankwise eval` against a reference loop, not against train's own evaluation (the same code).

A run folder is loaded with plain transformers + peft (PeftModel.from_pretrained, no rankwise), the held-out rows go
through it one at a time (no padding, no Trainer), and loss, accuracy, F1, MCC, Pearson and Spearman are computed by
hand (tests/reference_eval.py). The eval data are rows the run never trained on.
"""

from __future__ import annotations

import json

import pytest

from reference_eval import (assert_metrics_match, hand_binary_metrics, hand_regression_metrics, plain_peft_classifier,
                            reference_logits)
from test_training_fixtures import save_tiny_bert, sentences, write_csv, write_jsonl

TRAIN = ["--max-length", "32", "--batch-size", "8", "--device", "cpu", "-q"]


def _cli(argv, capsys) -> dict:
    from rankwise.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out) if out.strip() else {}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from conftest import minilm_path, missing

    if minilm_path() is None:
        missing("MiniLM not installed (its tokenizer serves the tiny model): make install")
    return save_tiny_bert(tmp_path_factory.mktemp("refs") / "tiny-bert", minilm_path())


@pytest.fixture(scope="module")
def binary_run(base, tmp_path_factory):
    """A LoRA run trained long enough to predict both classes on rows it never saw."""
    from rankwise.cli import main

    root = tmp_path_factory.mktemp("binary")
    train = write_csv(root / "train.csv", ["text", "label"], [[t, y] for t, y in sentences(48)])
    held = sentences(16, seed=7)
    held_csv = write_csv(root / "held.csv", ["text", "label"], [[t, y] for t, y in held])
    run = root / "run"
    assert main([str(a) for a in ["train", base, "--data", train, "--rank", "4", "--lr", "3e-2", "--max-steps",
                                  "24", "--out", run, *TRAIN]]) == 0
    return run, held_csv, held


def test_cli_eval_equals_a_plain_peft_reference_loop(base, binary_run, capsys):
    run, held_csv, held = binary_run
    got = _cli(["eval", run, "--data", held_csv, "--device", "cpu", "-q"], capsys)
    texts, labels = [t for t, _ in held], [y for _, y in held]
    want = hand_binary_metrics(reference_logits(plain_peft_classifier(base, run, 2), run, texts), labels)
    assert want["predicted"] == [0, 1]  # both classes predicted: F1 and MCC are not degenerate here
    assert got["num_samples"] == 16 and got["split"] == "validation"
    assert_metrics_match(got, want)


def test_cli_predict_equals_the_reference_softmax(base, binary_run, capsys):
    run, _, held = binary_run
    texts = [t for t, _ in held[:4]]
    from rankwise.cli import main

    capsys.readouterr()
    assert main(["predict", str(run), "--device", "cpu", *[a for t in texts for a in ("--text", t)]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    probs = reference_logits(plain_peft_classifier(base, run, 2), run, texts).softmax(-1)
    assert [r["label"] for r in rows] == [str(int(p.argmax())) for p in probs]
    assert [r["score"] for r in rows] == pytest.approx([float(p.max()) for p in probs], abs=1e-5)


def test_regression_eval_equals_a_reference_loop(base, tmp_path, capsys):
    """STS-B-like sentence pairs: eval_loss is the MSE, Pearson and Spearman by hand from the reference scores."""
    # a score the text decides (a positive word: about 1, a negative one: about -1), distinct for Spearman
    rows = [{"sentence1": t, "sentence2": " ".join(reversed(t.split())), "label": 2 * y - 1 + 0.01 * i}
            for i, (t, y) in enumerate(sentences(32))]
    data = write_jsonl(tmp_path / "sts.jsonl", rows)
    held = [{"sentence1": t, "sentence2": " ".join(reversed(t.split())), "label": 2 * y - 1 + 0.01 * i}
            for i, (t, y) in enumerate(sentences(12, seed=3))]
    held_file = write_jsonl(tmp_path / "held.jsonl", held)
    run = tmp_path / "run"
    _cli(["train", base, "--data", data, "--rank", "4", "--lr", "3e-2", "--max-steps", "24", "--out", run, *TRAIN], capsys)
    got = _cli(["eval", run, "--data", held_file, "--device", "cpu", "-q"], capsys)
    model = plain_peft_classifier(base, run, 1)
    assert model.config.problem_type in (None, "regression")
    scores = reference_logits(model, run, [r["sentence1"] for r in held], [r["sentence2"] for r in held])
    want = hand_regression_metrics(scores, [r["label"] for r in held])
    assert got["num_samples"] == 12 and float(scores.std()) > 1e-2  # scores that vary: correlations mean something
    assert_metrics_match(got, want, tol=1e-4)  # a correlation of float32 scores: 1e-4 is far below any real change
