"""Paths no other test walked: eval/predict/merge on AdaLoRA and peft_eva runs (against a plain-peft reference loop),
data-driven strategies with --quantize, and multirank with gradient accumulation."""

from __future__ import annotations

import json

import pytest
import torch

from reference_eval import assert_metrics_match, hand_binary_metrics, plain_peft_classifier, reference_logits
from test_training_fixtures import save_tiny_bert, sentences, write_csv

COMMON = ["--max-length", "32", "--device", "cpu", "-q"]
# rank 2 on the 12 linear layers of the tiny BERT: 8 of 32x32 (64 per rank), 4 of 64x32 or 32x64 (96 per rank)
BUDGET_RANK_2 = 2 * (8 * 64 + 4 * 96)


def _cli(argv, capsys) -> tuple[int, str, str]:
    from rankwise.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from conftest import minilm_path, missing

    if minilm_path() is None:
        missing("MiniLM not installed (its tokenizer serves the tiny model): make install")
    d = tmp_path_factory.mktemp("untested")
    save_tiny_bert(d / "tiny-bert", minilm_path())
    write_csv(d / "train.csv", ["text", "label"], [[t, y] for t, y in sentences(48)])
    write_csv(d / "held.csv", ["text", "label"], [[t, y] for t, y in sentences(16, seed=7)])
    return d


# ----- AdaLoRA and peft_eva runs: eval, predict, merge --------------------------------------------------------
@pytest.fixture(scope="module", params=["adalora", "peft_eva"])
def method_run(request, root):
    from rankwise.cli import main

    run = root / f"run-{request.param}"
    argv = ["train", root / "tiny-bert", "--data", root / "train.csv", "--method", request.param, "--budget-rank",
            "2", "--lr", "3e-2", "--max-steps", "24", "--batch-size", "8", "--out", run, *COMMON]
    assert main([str(a) for a in argv]) == 0
    return request.param, run


def test_eval_predict_merge_equal_a_plain_peft_reference(method_run, root, capsys, tmp_path):
    """The run folder loads in plain peft (PeftModel.from_pretrained: AdaLoRA with its pruned rank pattern, EVA's
    redistributed ranks); rankwise eval, predict and merge agree with that model run one row at a time."""
    from transformers import AutoModelForSequenceClassification

    method, run = method_run
    assert json.loads((run / "adapter_config.json").read_text())["peft_type"] == {"adalora": "ADALORA",
                                                                                   "peft_eva": "LORA"}[method]
    held = sentences(16, seed=7)
    texts, labels = [t for t, _ in held], [y for _, y in held]
    reference = plain_peft_classifier(root / "tiny-bert", run, 2)
    logits = reference_logits(reference, run, texts)
    want = hand_binary_metrics(logits, labels)

    code, out, err = _cli(["eval", run, "--data", root / "held.csv", "--device", "cpu", "-q"], capsys)
    assert code == 0, err
    got = json.loads(out)
    assert got["num_samples"] == 16
    assert_metrics_match(got, want)

    code, out, err = _cli(["predict", run, "--device", "cpu", *[a for t in texts[:4] for a in ("--text", t)]],
                          capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    probs = logits[:4].softmax(-1)
    assert [r["label"] for r in rows] == [str(int(p.argmax())) for p in probs]
    assert [r["score"] for r in rows] == pytest.approx([float(p.max()) for p in probs], abs=1e-5)

    code, _, err = _cli(["merge", run, "--out", tmp_path / "merged", "-q"], capsys)
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    merged_logits = reference_logits(merged, tmp_path / "merged", texts)
    assert torch.allclose(merged_logits, logits, atol=1e-4)
    # the adapter did something: the merged model is not the base with its fresh head
    lora_b = [p for n, p in reference.named_parameters() if "lora_B" in n and p.numel()]  # rank 0: empty
    assert max(float(p.abs().max()) for p in lora_b) > 0
