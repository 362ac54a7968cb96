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


# ----- data-driven strategies with --quantize ------------------------------------------------------------------
def _ranks_from_adapter(run) -> dict[str, int]:
    """Each layer's rank read from the saved weights (rows of lora_A), not from plan.json."""
    from safetensors.torch import load_file

    tensors = load_file(str(run / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v.shape[0]
            for k, v in tensors.items() if k.endswith(".lora_A.weight")}


def _check_spent(run, ranks: dict[str, int]) -> None:
    """sum r * (in + out) over the saved layers by hand, within one rank step of the hand budget."""
    from safetensors.torch import load_file

    tensors = load_file(str(run / "adapter_model.safetensors"))
    cost = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v.shape[1] for k, v in
            tensors.items() if k.endswith(".lora_A.weight")}
    for k, v in tensors.items():
        if k.endswith(".lora_B.weight"):
            cost[k.removeprefix("base_model.model.").removesuffix(".lora_B.weight")] += v.shape[0]
    spent = sum(r * cost[n] for n, r in ranks.items())
    assert len(ranks) == 12 and BUDGET_RANK_2 - 64 < spent <= BUDGET_RANK_2


@pytest.mark.parametrize("strategy", ["activation", "eva"])
def test_forward_only_strategies_with_quantize_plan_as_full_precision(strategy, root, capsys):
    """activation and eva calibrate with forward passes through the 4-bit model: the same ranks as the
    full-precision run on this model, the budget spent as counted by hand from the saved adapter."""
    from conftest import require

    require("bitsandbytes", "--quantize needs bitsandbytes: pip install -e '.[qlora]'")
    ranks = {}
    for quantize in ([], ["--quantize", "4bit"]):
        run = root / f"{strategy}-{'q' if quantize else 'f'}"
        code, _, err = _cli(["train", root / "tiny-bert", "--data", root / "train.csv", "--strategy", strategy,
                             "--budget-rank", "2", "--calib-samples", "16", "--max-steps", "1", "--out", run,
                             *quantize, *COMMON], capsys)
        assert code == 0, err
        ranks[bool(quantize)] = _ranks_from_adapter(run)
        _check_spent(run, ranks[bool(quantize)])
    assert json.loads((run / "results.json").read_text())["run_info"]["quantization"]["bits"] == 4
    assert ranks[True] == ranks[False] and len(set(ranks[True].values())) > 1  # not a uniform plan


def test_gradient_strategy_with_quantize_is_one_line_and_the_way_out_works(root, capsys):
    """gradient needs dL/dW of float weights, which packed 4-bit weights lack: one line, exit 2, no run folder
    (before: torch's "only Tensors of floating point dtype can require gradients", exit 1). The way it names
    (plan on the full-precision model, train with --plan and --quantize) trains with exactly the planned ranks."""
    from conftest import require

    require("bitsandbytes", "--quantize needs bitsandbytes: pip install -e '.[qlora]'")
    run = root / "gradient-q"
    code, _, err = _cli(["train", root / "tiny-bert", "--data", root / "train.csv", "--strategy", "gradient",
                         "--budget-rank", "2", "--calib-samples", "16", "--max-steps", "1", "--quantize", "4bit",
                         "--out", run, *COMMON], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "plan on the full-precision model" in err
    assert not run.exists()
    plan = root / "gradient-plan"
    code, _, err = _cli(["plan", root / "tiny-bert", "--strategy", "gradient", "--budget-rank", "2", "--data",
                         root / "train.csv", "--calib-samples", "16", "--out", plan, "-q"], capsys)
    assert code == 0, err
    planned = {r["name"]: r["rank"] for r in json.loads((plan / "plan.json").read_text())["layers"] if r["rank"]}
    code, _, err = _cli(["train", root / "tiny-bert", "--data", root / "train.csv", "--plan", plan, "--quantize",
                         "4bit", "--max-steps", "1", "--out", run, *COMMON], capsys)
    assert code == 0, err
    saved = _ranks_from_adapter(run)
    assert {k.removeprefix("bert."): v for k, v in saved.items()} == planned
    _check_spent(run, saved)


# ----- multirank with gradient accumulation --------------------------------------------------------------------
def test_multirank_grad_accum_equals_the_doubled_batch(root, capsys):
    """2 accumulated batches of 4 step like one batch of 8 (same rows, mean loss, dropout 0): every saved tensor
    (A, B, the branch coefficients, the head) ends equal, and training moved them."""
    import shutil

    from safetensors.torch import load_file

    # without dropout a run is a function of the data order and the batch (dropout masks would be drawn per batch)
    still = root / "still-bert"
    if not still.exists():
        shutil.copytree(root / "tiny-bert", still)
        cfg = json.loads((still / "config.json").read_text())
        (still / "config.json").write_text(json.dumps({**cfg, "hidden_dropout_prob": 0.0,
                                                       "attention_probs_dropout_prob": 0.0}))
    saved, curves = {}, {}
    for name, flags in (("b8", ["--batch-size", "8"]), ("ga", ["--batch-size", "4", "--grad-accum", "2"])):
        run = root / f"multirank-{name}"
        code, _, err = _cli(["train", still, "--data", root / "train.csv", "--method", "multirank",
                             "--ranks", "4,2", "--targets", "query,value", "--lr", "1e-2", "--max-steps", "3",
                             "--seed", "3", "--out", run, *flags, *COMMON], capsys)
        assert code == 0, err
        saved[name] = load_file(str(run / "multirank_model.safetensors"))
        curves[name] = [x["loss"] for x in json.loads((run / "results.json").read_text())["train_info"]["loss_curve"]]
    # Adam barely sees a gradient scaled by 2, so the logged loss checks the mean: 2 x the mean would show here
    assert len(curves["ga"]) == 3 and curves["ga"] == pytest.approx(curves["b8"], abs=1e-5)
    assert set(saved["b8"]) == set(saved["ga"])
    coefficients = [k for k in saved["b8"] if "coefficient" in k]
    assert len(coefficients) == 4
    for key, value in saved["b8"].items():
        assert torch.allclose(saved["ga"][key], value, atol=1e-5, rtol=1e-4), key
    # moved from their start: coefficients start at ones (coefficient_init=ones), B at zero
    assert any(not torch.allclose(saved["b8"][k], torch.ones_like(saved["b8"][k])) for k in coefficients)
    assert any(float(v.abs().max()) > 0 for k, v in saved["b8"].items() if "lora_B" in k or "_B" in k)
