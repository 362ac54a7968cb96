"""train(): every head type on tiny saved models, the run folder contract, reload/merge equality, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from rankwise.training import evaluate_run, merge_run, predict
from rankwise.training.run import train_model
from rankwise.types import RankwiseError
from test_training_fixtures import sentences, tiny_bert_dir, tiny_llama_dir, write_csv, write_jsonl  # noqa: F401

FAST = dict(max_steps=2, batch_size=4, max_length=32, progress=False, device="cpu")


def _binary(tmp_path, n=24):
    rows = [{"sentence": t, "label": y} for t, y in sentences(n)]
    d = tmp_path / "bin"
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "validation.jsonl", rows[:8])
    return d


def _logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_binary_run_folder_and_reload(tmp_path, tiny_bert_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "run"
    results, model = train_model(str(tiny_bert_dir), _binary(tmp_path), out=out, preset="balanced", **FAST)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "plan.json", "task.json", "results.json",
            "tokenizer.json"} <= names
    assert not list(tmp_path.glob(".run.partial-*"))
    saved = json.loads((out / "results.json").read_text())
    assert saved["schema"] == 1 and set(saved) >= {"run_info", "train_info", "eval"}
    assert {"eval_accuracy", "eval_f1", "eval_mcc"} <= set(saved["eval"])
    ti = saved["train_info"]
    assert ti["steps"] == 2 and ti["peak_memory_bytes"] > 0
    assert 0 <= ti["peak_memory_increase_bytes"] < ti["peak_memory_bytes"]  # without the libraries loaded before
    assert saved["run_info"]["preset"] == "balanced" and saved["run_info"]["versions"]["peft"]

    tok = AutoTokenizer.from_pretrained(out)
    base, loading = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2,
                                                                       output_loading_info=True)
    # task.json names the heads the base checkpoint lacks (transformers' own report), which the adapter restores
    restored = json.loads((out / "task.json").read_text())["restored_heads"]
    assert restored == ["classifier"]
    assert {k for k in loading["missing_keys"] if not k.startswith("classifier.")} == set()
    reloaded = PeftModel.from_pretrained(base, out).eval()  # plain peft, no rankwise
    texts = ["good movie", "the plot was awful and the actor poor"]
    diff = (_logits(model, tok, texts) - _logits(reloaded, tok, texts)).abs().max().item()
    assert diff <= 1e-5

    merged_dir = merge_run(out, tmp_path / "merged", progress=False)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert (_logits(model, tok, texts) - _logits(merged, tok, texts)).abs().max().item() <= 1e-4


def test_same_seed_same_run(tmp_path, tiny_bert_dir):
    data = _binary(tmp_path)
    a, _ = train_model(str(tiny_bert_dir), data, out=tmp_path / "a", rank=2, seed=5, **FAST)
    b, _ = train_model(str(tiny_bert_dir), data, out=tmp_path / "b", rank=2, seed=5, **FAST)
    assert a["train_info"]["loss_curve"] == b["train_info"]["loss_curve"]
    assert a["eval"] == b["eval"]


def test_multiclass_string_labels_and_predict(tmp_path, tiny_bert_dir):
    labels = ["negative", "neutral", "positive"]
    csv = write_csv(tmp_path / "tweets.csv", ["sentiment", "confidence", "text"],
                    [[labels[i % 3], 0.5, t] for i, (t, _) in enumerate(sentences(30))])
    out = tmp_path / "run"
    results, _ = train_model(str(tiny_bert_dir), csv, out=out, rank=2, targets=["query", "value"], **FAST)
    assert "eval_macro_f1" in results["eval"] and "eval_f1" not in results["eval"]
    task = json.loads((out / "task.json").read_text())
    assert task["data"]["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    preds = predict(out, ["good movie", "bad plot"], device="cpu")
    assert all(p["label"] in labels and 0 <= p["score"] <= 1 for p in preds)
    metrics = evaluate_run(out, csv, progress=False, device="cpu")
    assert metrics["num_samples"] == 30 and "eval_accuracy" in metrics


def test_regression_sentence_pairs(tmp_path, tiny_bert_dir):
    rows = [{"sentence1": t, "sentence2": t[::-1], "label": float(i % 5) + 0.5}
            for i, (t, _) in enumerate(sentences(20))]
    data = write_jsonl(tmp_path / "sts.jsonl", rows)
    out = tmp_path / "run"
    results, model = train_model(str(tiny_bert_dir), data, out=out, preset="efficient", **FAST)
    assert {"eval_pearson", "eval_spearman"} <= set(results["eval"])
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    assert "score" in predict(out, ["a b"], text_pairs=["b a"], device="cpu")[0]


def test_causal_lm_instructions(tmp_path, tiny_llama_dir):
    rows = [{"instruction": f"Say {w}.", "input": "" if i % 2 else "now", "output": w} for i, (w, _) in
            enumerate(sentences(16))]
    data = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    out = tmp_path / "run"
    results, _ = train_model(str(tiny_llama_dir), data, out=out, preset="expressive", lr=1e-2,
                             **{**FAST, "max_steps": 4, "max_length": 96})
    ev = results["eval"]
    assert results["run_info"]["task"] == "causal-lm"
    assert json.loads((out / "task.json").read_text())["restored_heads"] == []  # lm_head is in the checkpoint
    assert {"eval_loss_before", "eval_loss", "perplexity"} <= set(ev) and ev["eval_loss"] < ev["eval_loss_before"]
    assert isinstance(predict(out, "Say good.", max_new_tokens=3, device="cpu")[0]["text"], str)


def test_instruction_loss_is_on_the_response_only(tiny_llama_dir):
    from datasets import Dataset

    from rankwise.training.tasks import encode_instructions, format_prompt, load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    row = {"instruction": "Name a colour.", "input": "", "output": "blue"}
    enc = encode_instructions(Dataset.from_list([row]), tok, max_length=128)[0]
    n_prompt = len(tok(format_prompt(row))["input_ids"])
    assert all(t == -100 for t in enc["labels"][:n_prompt])
    assert tok.decode([t for t in enc["labels"] if t != -100]).startswith("blue")


def test_plain_text_blocks(tmp_path, tiny_llama_dir):
    f = tmp_path / "book.txt"
    f.write_text("".join(f"the good movie had a poor plot {i}\n" for i in range(60)))
    results, _ = train_model(str(tiny_llama_dir), f, out=tmp_path / "run", rank=2, **FAST)
    assert results["run_info"]["data_info"]["kind"] == "text" and results["eval"]["num_samples"] >= 1


def test_plan_for_another_model_and_unmapped_preset(tmp_path, tiny_bert_dir, tiny_llama_dir, gpt2):
    from rankwise import make_plan

    data = _binary(tmp_path)
    plan = make_plan(gpt2, "uniform", budget_rank=2, progress=False)
    with pytest.raises(RankwiseError, match="another model"):
        train_model(str(tiny_bert_dir), data, out=tmp_path / "x", plan=plan, **FAST)
    from rankwise.training.presets import preset_targets

    with pytest.raises(RankwiseError, match="no mapping for model type 't5'"):
        preset_targets("balanced", "t5")
    assert preset_targets("expressive", "gpt2") == ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    with pytest.raises(RankwiseError, match="one adapter choice"):
        train_model(str(tiny_bert_dir), data, out=tmp_path / "y", preset="balanced", rank=4, **FAST)
    with pytest.raises(RankwiseError, match="already exists"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "f").write_text("x")
        train_model(str(tiny_bert_dir), data, out=tmp_path / "full", **FAST)
