"""Tests against independent references: hand-computed allocator scores and ranks, LoRA numerics against
W + s * B A computed by hand, merged logits against adapter logits through the CLI, `eval` against results.json,
and every public name resolving. None of them compares the code with its own output."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import pkgutil

import pytest
import torch

import rankwise
from rankwise.allocators import allocate
from rankwise.types import Budget, LayerInfo, LayerStats
from conftest import minilm_or_skip
from test_training_fixtures import save_tiny_bert, sentences, write_jsonl


def _layers(metrics: list[dict], shape=(64, 64)) -> list[LayerStats]:
    return [LayerStats(LayerInfo(f"layers.{i}.proj", *shape, depth=i), m) for i, m in enumerate(metrics)]


# ----- allocators: scores and rank direction by hand ---------------------------------------------------------
def test_spectral_scores_and_ranks_by_hand():
    # alpha_hill 2, 4, 6 -> alpha_norm 0, .5, 1; spikes 10, 5, 0 -> spikes_norm 1, .5, 0
    # score = 0.7 * alpha_norm + 0.3 * (1 - spikes_norm) = 0, 0.5, 1.0
    stats = _layers([{"alpha_hill": 2.0, "num_spikes": 10.0}, {"alpha_hill": 4.0, "num_spikes": 5.0},
                     {"alpha_hill": 6.0, "num_spikes": 0.0}])
    # weights = floor 0.1 + score -> 0.1, 0.6, 1.1; a budget of 36 ranks x 128 params/rank -> ranks 2, 12, 22
    a = allocate("spectral", stats, Budget(36 * 128))
    assert [a.pattern.scores[s.name] for s in stats] == pytest.approx([0.0, 0.5, 1.0])
    assert [a.pattern.ranks[s.name] for s in stats] == [2, 12, 22]
    assert a.spent == 36 * 128


def test_spectral_direction_is_alpha_up_spikes_down():
    """The layer with the highest Hill alpha and no spikes gets the most rank; the reverse layer the least."""
    stats = _layers([{"alpha_hill": 7.0, "num_spikes": 0.0}, {"alpha_hill": 3.0, "num_spikes": 20.0},
                     {"alpha_hill": 5.0, "num_spikes": 10.0}])
    r = allocate("spectral", stats, Budget(30 * 128)).pattern.ranks
    assert r["layers.0.proj"] > r["layers.2.proj"] > r["layers.1.proj"]


def test_weight_norm_ranks_proportional_by_hand():
    # stable ranks 1, 2, 4; 28 ranks of budget -> 4, 8, 16 (proportional, exact)
    stats = _layers([{"stable_rank": 1.0}, {"stable_rank": 2.0}, {"stable_rank": 4.0}])
    a = allocate("weight_norm", stats, Budget(28 * 128))
    assert [a.pattern.ranks[s.name] for s in stats] == [4, 8, 16]
    # frobenius_norm with power 2: weights 9, 1, 4 (norms 3, 1, 2) -> 28 ranks as 18, 2, 8
    stats = _layers([{"frobenius_norm": 3.0}, {"frobenius_norm": 1.0}, {"frobenius_norm": 2.0}])
    a = allocate("weight_norm", stats, Budget(28 * 128), metric="frobenius_norm", power=2.0)
    assert [a.pattern.ranks[s.name] for s in stats] == [18, 2, 8]


# ----- LoRA numerics ------------------------------------------------------------------------------------------
def test_gpt2_conv1d_lora_equals_w_plus_scaled_ba(gpt2):
    """GPT-2's Conv1D stores W as [in, out]; the adapted layer must compute x @ (W + s (B A)^T) + b, with B
    non-zero (at B = 0 any wrapper that ignores the adapter would pass)."""
    from rankwise import apply, make_plan
    from rankwise.targets import resolve_targets

    stats = [LayerStats(info) for info in resolve_targets(gpt2)]
    plan = make_plan(gpt2, "uniform", budget_rank=3, stats=stats, alpha_factor=1.5)
    name = "transformer.h.1.attn.c_attn"
    w = gpt2.get_submodule(name).weight.detach().clone()  # [in, out]
    bias = gpt2.get_submodule(name).bias.detach().clone()
    peft_model = apply(gpt2, plan)
    layer = peft_model.get_base_model().get_submodule(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    a = layer.lora_A["default"].weight.detach()  # [r, in]
    b = layer.lora_B["default"].weight.detach()  # [out, r]
    s = 1.5 * 3 / 3  # alpha / r with alpha = alpha_factor * r
    x = torch.randn(2, 5, w.shape[0], generator=g)
    want = x @ (w + s * (b @ a).T) + bias
    with torch.no_grad():
        got = layer(x)
    assert (b @ a).abs().max() > 0.1  # the update is really there
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


# ----- through the CLI ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_bert(tmp_path_factory):
    """One tiny BERT and one run trained through the CLI for the module; the tests only read them."""
    from rankwise.cli import main

    root = tmp_path_factory.mktemp("references")
    bert = save_tiny_bert(root / "tiny-bert", minilm_or_skip())
    rows = [{"sentence": t, "label": y} for t, y in sentences(40)]
    data = root / "data"
    write_jsonl(data / "train.jsonl", rows[:32])
    write_jsonl(data / "validation.jsonl", rows[32:])
    run = root / "run"
    out, err = io.StringIO(), io.StringIO()  # kept out of the first test's capsys, which reads its own output
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", str(bert), "--data", str(data), "--rank", "2", "--max-steps", "4",
                     "--batch-size", "8", "--lr", "5e-3", "--out", str(run), "-q", "--device", "cpu"])
    assert code == 0, err.getvalue()
    return bert, run, data


@pytest.fixture
def trained(trained_bert):
    return trained_bert[1:]


@pytest.fixture
def tiny_bert_dir(trained_bert):
    return trained_bert[0]


def _logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_cli_merged_logits_equal_adapter_logits(trained, tiny_bert_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rankwise.cli import main

    run, _ = trained
    assert main(["merge", str(run), "--out", str(tmp_path / "merged"), "-q"]) == 0, capsys.readouterr().err
    tok = AutoTokenizer.from_pretrained(run)
    texts = ["good movie", "the plot was awful and the actor poor", "a very fine film"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    adapter = PeftModel.from_pretrained(base, str(run)).eval()  # plain peft, not rankwise
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    lora_b = [p for n, p in adapter.named_parameters() if "lora_B" in n]
    assert max(p.abs().max().item() for p in lora_b) > 0  # trained: merging has something to fold in
    assert torch.allclose(_logits(adapter, tok, texts), _logits(merged, tok, texts), atol=1e-5)


def test_cli_predict_equals_plain_peft_softmax(trained, tiny_bert_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rankwise.cli import main

    run, _ = trained
    texts = ["good movie", "the plot was awful"]
    argv = ["predict", str(run), "--device", "cpu"] + [a for t in texts for a in ("--text", t)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = AutoTokenizer.from_pretrained(run)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    probs = _logits(PeftModel.from_pretrained(base, str(run)).eval(), tok, texts).softmax(-1)
    for row, p in zip(rows, probs):
        assert row["label"] == str(int(p.argmax())) and row["score"] == pytest.approx(float(p.max()), abs=1e-5)


def test_cli_eval_reproduces_results_json(trained, capsys):
    from rankwise.cli import main

    run, data = trained
    saved = json.loads((run / "results.json").read_text())["eval"]
    assert main(["eval", str(run), "--data", str(data), "-q", "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["num_samples"] == saved["num_samples"] == 8
    for key in ("eval_loss", "eval_accuracy", "eval_f1", "eval_mcc"):
        assert again[key] == pytest.approx(saved[key], abs=1e-5), key


# ----- public names -------------------------------------------------------------------------------------------
def _modules():
    names = ["rankwise"]
    for info in pkgutil.walk_packages(rankwise.__path__, "rankwise."):
        if info.name != "rankwise.__main__":
            names.append(info.name)
    return names


def test_every_name_in_all_resolves():
    """Each module's __all__ lists no name twice and only names that exist (one test over every module; a failure
    names each module and name at once)."""
    problems = []
    for module in _modules():
        mod = importlib.import_module(module)
        names = list(getattr(mod, "__all__", []))
        if len(names) != len(set(names)):
            problems.append(f"{module}.__all__ lists a name twice")
        missing = [n for n in names if not hasattr(mod, n)]
        if missing:
            problems.append(f"{module}.__all__ names {missing}, which do not exist")
    assert len(_modules()) > 50  # the walk found the package (a walk that found nothing would pass)
    assert not problems, "\n".join(problems)
