"""Metrics per head type, presets per family, and task inference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from rankwise.training.metrics import classification_metrics, metrics_fn, perplexity, regression_metrics
from rankwise.training.presets import build_plan
from rankwise.training.tasks import infer_task
from rankwise.types import RankwiseError


def test_binary_metrics():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    m = classification_metrics(logits, np.array([0, 1, 0, 0]))
    assert m["accuracy"] == 0.75 and m["f1"] == pytest.approx(2 / 3)
    # predictions 0,1,1,0 use both classes; labels 0,1,0,0 hold both classes (the collapse check reads these)
    assert set(m) == {"accuracy", "f1", "mcc", "predicted_classes", "label_classes"}
    assert m["predicted_classes"] == 2 and m["label_classes"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert classification_metrics(logits[:1], np.array([0]))["mcc"] == 0.0  # one class: no warning


def test_classification_metrics_match_sklearn():
    """The numpy formulas against scikit-learn itself, on random and degenerate label/prediction sets: one class
    only, class 1 never seen, classes missing from predictions or labels, constant predictions."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, k, n), rng.integers(0, k, n)) for k in (2, 3, 5) for n in (1, 7, 50, 333)]
    cases += [(np.zeros(6, int), np.zeros(6, int)), (np.zeros(6, int), np.ones(6, int)),
              (np.array([0, 0, 2, 2]), np.array([0, 2, 2, 2])), (np.array([0, 1, 1, 3]), np.array([0, 0, 0, 0])),
              (np.array([4, 4, 1]), np.array([0, 2, 3]))]
    for labels, preds in cases:
        k = 2 if max(labels.max(), preds.max()) < 2 else 5
        m = classification_metrics(np.eye(k)[preds], labels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert m["accuracy"] == accuracy_score(labels, preds)
            if k == 2:
                assert m["f1"] == pytest.approx(f1_score(labels, preds, zero_division=0), abs=1e-12)
                assert m["mcc"] == pytest.approx(matthews_corrcoef(labels, preds), abs=1e-12)
            else:
                ref = f1_score(labels, preds, average="macro", zero_division=0)
                assert m["macro_f1"] == pytest.approx(ref, abs=1e-12)
            assert m["predicted_classes"] == len(set(preds)) and m["label_classes"] == len(set(labels))


def test_multiclass_metrics():
    logits = np.eye(3)[[0, 1, 2, 2]]
    m = classification_metrics(logits, np.array([0, 1, 2, 0]))
    assert m["accuracy"] == 0.75 and "macro_f1" in m and "f1" not in m


def test_regression_metrics():
    m = regression_metrics(np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.5, 2.9]))
    assert m["pearson"] > 0.9 and m["spearman"] == pytest.approx(1.0)
    assert regression_metrics(np.ones(3), np.array([1.0, 2.0, 3.0]))["pearson"] == 0.0


def test_metrics_fn_and_perplexity():
    class P:
        predictions, label_ids = (np.array([[0.0, 1.0]]),), np.array([1])

    assert metrics_fn("class")(P())["accuracy"] == 1.0
    assert perplexity(0.0) == 1.0 and perplexity(1.0) == pytest.approx(math.e) and perplexity(1e4) == math.inf


def test_infer_task():
    class Cfg:
        architectures = ["LlamaForCausalLM"]

    assert infer_task("auto", "table", True, Cfg) == "seq-cls"
    assert infer_task("auto", "instruction", False, None) == "causal-lm"
    assert infer_task("auto", "table", False, Cfg) == "causal-lm"
    with pytest.raises(RankwiseError, match="cannot infer"):
        infer_task("auto", "table", False, object())
    with pytest.raises(RankwiseError, match="needs a label column"):
        infer_task("seq-cls", "table", False, None)


# docs/train.md and docs/qlora.md, written out: the rank of each preset, and the modules of each family (the two
# layers of every tiny model), with the LoRA parameters sum r * (in + out) counted by hand from their shapes.
_BERT = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
         "o": "attention.output.dense", "i": "intermediate.dense", "f": "output.dense"}
_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "g": "mlp.gate_proj", "u": "mlp.up_proj", "d": "mlp.down_proj"}
_GPT2 = {"a": "attn.c_attn", "p": "attn.c_proj", "c": "mlp.c_fc", "m": "mlp.c_proj"}
_DOCUMENTED = {  # preset: (rank, {family: (module keys, LoRA params by hand)})
    # bert: q/k/v/o are 32x32 (64 per rank), intermediate 64x32 and output 32x64 (96); 2 layers
    # llama: q, o 32x32 (64), k, v 16x32 (48), gate/up/down 96; gpt2: c_attn 32->96 (128), attn.c_proj 64,
    # c_fc and mlp.c_proj 160
    "efficient": (4, {"bert": ("qv", 2 * 4 * 128), "llama": ("qv", 2 * 4 * 112), "gpt2": ("a", 2 * 4 * 128)}),
    "balanced": (8, {"bert": ("qkvo", 2 * 8 * 256), "llama": ("qkvo", 2 * 8 * 224), "gpt2": ("ap", 2 * 8 * 192)}),
    "expressive": (16, {"bert": ("qkvoif", 2 * 16 * 448), "llama": ("qkvogud", 2 * 16 * 512),
                        "gpt2": ("apcm", 2 * 16 * 512)}),
    "qlora_memory": (4, {"bert": ("qv", 2 * 4 * 128), "llama": ("qv", 2 * 4 * 112), "gpt2": ("a", 2 * 4 * 128)}),
    "qlora_quality": (8, {"bert": ("qkvo", 2 * 8 * 256), "llama": ("qkvo", 2 * 8 * 224),
                          "gpt2": ("ap", 2 * 8 * 192)}),
}


@pytest.mark.parametrize("preset", list(_DOCUMENTED))
def test_presets_build_uniform_plans(preset, bert, llama, gpt2):
    """Each preset's rank, layers and parameter count as the docs state them (not the code's PRESET_RANKS)."""
    rank, per_family = _DOCUMENTED[preset]
    families = {"bert": (bert, "encoder.layer.{}.", _BERT), "llama": (llama, "model.layers.{}.", _LLAMA),
                "gpt2": (gpt2, "transformer.h.{}.", _GPT2)}
    for family, (model, prefix, modules) in families.items():
        keys, params = per_family[family]
        plan, desc = build_plan(model, model_name="m", preset=preset, progress=False)
        assert plan.strategy == "uniform" and {r.rank for r in plan.adapted} == {rank}, family
        assert {r.name for r in plan.adapted} == {prefix.format(i) + modules[k] for i in (0, 1) for k in keys}
        assert plan.spent == params and desc["preset"] == preset


def test_balanced_bert_does_not_adapt_ffn_output(bert):
    plan, _ = build_plan(bert, model_name="m", preset="balanced", progress=False)
    names = [r.name for r in plan.adapted]
    assert any(n.endswith("attention.output.dense") for n in names)
    assert not any(n.endswith("layer.0.output.dense") for n in names)


def test_rank_and_strategy_choices(bert):
    plan, desc = build_plan(bert, model_name="m", rank=2, targets=["query"], progress=False)
    assert desc["source"] == "rank" and len(plan.adapted) == 2
    plan, desc = build_plan(bert, model_name="m", strategy="spectral", budget_rank=2, progress=False)
    assert desc["strategy"] == "spectral" and plan.spent <= plan.budget.params
    with pytest.raises(RankwiseError, match="exactly one of --budget"):
        build_plan(bert, model_name="m", strategy="spectral", progress=False)
