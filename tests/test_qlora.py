"""QLoRA (`--quantize`): tiny BERT/Llama train a step on a bitsandbytes base, heads stay float, plans measure the
full-precision weights, merge folds into the full-precision base, and every misuse is one clear line."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import require

from rankwise.training import evaluate_run, merge_run
from rankwise.training.quantize import check_quantized, quant_spec
from rankwise.training.run import train_model
from rankwise.types import RankwiseError
from test_training_fixtures import sentences, tiny_bert_dir, tiny_llama_dir, write_jsonl  # noqa: F401


@pytest.fixture
def bnb():
    """bitsandbytes, asked for by each test that quantises: without it those tests skip with the reason (fail under
    CI=true) while the flag and error checks below still run. (At import time a missing module was a collection
    error that stopped the whole run.)"""
    return require("bitsandbytes", "QLoRA tests need bitsandbytes: pip install -e '.[qlora]'")

FAST = dict(max_steps=1, batch_size=4, max_length=32, progress=False, device="cpu")


def _binary(tmp_path, n=16):
    rows = [{"sentence": t, "label": y} for t, y in sentences(n)]
    d = tmp_path / "bin"
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "validation.jsonl", rows[:8])
    return d


def _alpaca(tmp_path):
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w, _ in sentences(12)]
    return write_jsonl(tmp_path / "alpaca.jsonl", rows)


def _bnb_types(bnb):
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def test_bert_4bit_trains_with_a_float_head(tmp_path, tiny_bert_dir, bnb):
    q4, _ = _bnb_types(bnb)
    data = _binary(tmp_path)
    two = {**FAST, "max_steps": 2}  # the first step is the warmup's, at learning rate 0
    results, model = train_model(str(tiny_bert_dir), data, out=tmp_path / "q", preset="qlora_memory", **two)
    assert results["run_info"]["quantization"] == {"method": "bitsandbytes", "bits": 4, "quant_type": "nf4",
                                                   "double_quant": False, "compute_dtype": "float32"}
    task = json.loads((tmp_path / "q" / "task.json").read_text())
    assert task["quantization"]["bits"] == 4
    base = model.get_base_model()
    assert isinstance(base.bert.encoder.layer[0].attention.self.query.base_layer, q4)
    # qlora_memory = r 4 on query/value only
    assert not hasattr(base.bert.encoder.layer[0].attention.self.key, "base_layer")
    assert model.peft_config["default"].r == 4
    # the head and pooler: float copies, trained (modules_to_save), never quantised
    for saved in (base.classifier.modules_to_save["default"], base.bert.pooler.modules_to_save["default"].dense):
        assert type(saved) is torch.nn.Linear and saved.weight.dtype == torch.float32 and saved.weight.requires_grad
    lora_b = base.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    assert lora_b.abs().sum() > 0  # B starts at zero: the optimizer step moved it

    plain, _ = train_model(str(tiny_bert_dir), data, out=tmp_path / "f", preset="efficient", **two)
    assert plain["run_info"]["quantization"] is None
    # same adapter, same parameter count; the 4-bit weights take less memory
    assert results["train_info"]["total_params"] == plain["train_info"]["total_params"]
    assert results["train_info"]["trainable_params"] == plain["train_info"]["trainable_params"]
    assert results["train_info"]["model_memory_bytes"] < plain["train_info"]["model_memory_bytes"]

    # eval reloads the base quantised, as trained: the same loss as results.json
    again = evaluate_run(tmp_path / "q", data, device="cpu", progress=False)
    assert again["eval_loss"] == pytest.approx(results["eval"]["eval_loss"], abs=1e-5)


def test_llama_4bit_fp4_double_quant_trains_and_evaluates(tmp_path, tiny_llama_dir, bnb):
    q4, _ = _bnb_types(bnb)
    results, model = train_model(str(tiny_llama_dir), _alpaca(tmp_path), out=tmp_path / "run", rank=2,
                                 targets=["q_proj", "v_proj"], quantize="4bit", quant_type="fp4", double_quant=True,
                                 lr=1e-2, **{**FAST, "max_length": 96})
    q = results["run_info"]["quantization"]
    assert (q["bits"], q["quant_type"], q["double_quant"]) == (4, "fp4", True)
    assert {"eval_loss", "eval_loss_before", "perplexity"} <= set(results["eval"])
    base = model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, q4)
    assert isinstance(base.model.layers[0].mlp.up_proj, q4)  # not adapted, still quantised
    assert type(base.lm_head) is torch.nn.Linear  # the output head is never quantised
    assert results["train_info"]["steps"] == 1


def test_8bit_bert(tmp_path, tiny_bert_dir, bnb):
    _, q8 = _bnb_types(bnb)
    results, model = train_model(str(tiny_bert_dir), _binary(tmp_path), out=tmp_path / "run", rank=2,
                                 targets=["query"], quantize="8bit", **FAST)
    assert results["run_info"]["quantization"]["bits"] == 8
    assert isinstance(model.get_base_model().bert.encoder.layer[1].intermediate.dense, q8)


def test_strategy_plans_on_the_full_precision_weights(tmp_path, tiny_bert_dir, bnb):
    from rankwise.plan import make_plan

    results, _ = train_model(str(tiny_bert_dir), _binary(tmp_path), out=tmp_path / "run", strategy="spectral",
                             budget="6k", quantize="4bit", **FAST)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    got = {r["name"]: r["rank"] for r in plan["layers"]}
    want = make_plan(str(tiny_bert_dir), "spectral", "6k", progress=False)  # the unquantised checkpoint
    assert got == {r.name: r.rank for r in want.layers}
    assert results["run_info"]["adapter"]["spent"] == want.spent


def test_merge_folds_into_the_full_precision_base(tmp_path, tiny_bert_dir, bnb):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, BertModel

    run = tmp_path / "run"
    train_model(str(tiny_bert_dir), _binary(tmp_path), out=run, rank=2, targets=["query"], quantize="4bit",
                lr=5e-2, **{**FAST, "max_steps": 2})
    merged = AutoModelForSequenceClassification.from_pretrained(merge_run(run, tmp_path / "merged", progress=False))
    # by hand: the original float32 weight + (alpha / r) * B @ A from the saved adapter
    w0 = BertModel.from_pretrained(tiny_bert_dir).encoder.layer[1].attention.self.query.weight.detach()
    ad = load_file(str(run / "adapter_model.safetensors"))
    cfg = json.loads((run / "adapter_config.json").read_text())
    pre = "base_model.model.bert.encoder.layer.1.attention.self.query"
    a, b = ad[f"{pre}.lora_A.weight"], ad[f"{pre}.lora_B.weight"]
    scale = cfg["lora_alpha"] / cfg["r"]
    want = w0 + scale * b @ a
    got = merged.bert.encoder.layer[1].attention.self.query.weight.detach()
    assert got.dtype == torch.float32 and (b @ a).abs().max() > 0
    assert (got - want).abs().max().item() <= 1e-6
    assert torch.equal(merged.classifier.weight, ad["base_model.model.classifier.weight"])


def test_flag_errors_are_one_line():
    for args, msg in [((None, "fp4"), "need --quantize 4bit"), (("3bit",), "--quantize must be one of"),
                      (("8bit", "nf4"), "4-bit options"), (("4bit", "int4"), "--quant-type must be"),
                      (("4bit", None, False, "float64"), "--compute-dtype must be")]:
        with pytest.raises(RankwiseError, match=msg) as e:
            quant_spec(*args)
        assert "\n" not in str(e.value)


def test_missing_bitsandbytes_is_one_line(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    from rankwise.cli import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    code = main(["train", str(tiny_bert_dir), "--data", str(_binary(tmp_path)), "--preset", "qlora_quality",
                 "--out", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "bitsandbytes" in err and "rankwise[qlora]" in err
    assert not (tmp_path / "run").exists()


def test_method_without_quantisation_support_is_refused():
    from rankwise.methods import Method
    from rankwise.training.quantize import run_quantization

    class NoQuant(Method):
        name = "noquant"

    with pytest.raises(RankwiseError, match="--quantize works with --method lora"):
        run_quantization(NoQuant(), None, "4bit")
    with pytest.raises(RankwiseError, match="--quantize works with --method lora"):
        run_quantization(NoQuant(), "qlora_memory", None)  # the QLoRA presets imply 4-bit
    assert run_quantization(NoQuant(), "balanced", None) is None


def test_unquantisable_or_quantised_head_is_one_line(tiny_bert_dir, tmp_path, bnb):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    spec = quant_spec("4bit")
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    with pytest.raises(RankwiseError, match="quantised no layer"):
        check_quantized(plain, spec, "tiny")
    # without the skip list bitsandbytes quantises the new classifier too, which then cannot be trained
    cfg = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=[])
    bad = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2, quantization_config=cfg,
                                                             device_map={"": "cpu"})
    with pytest.raises(RankwiseError, match="quantised the task head") as e:
        check_quantized(bad, spec, "tiny")
    assert "\n" not in str(e.value)


def test_cli_flags_reach_the_run(tmp_path, tiny_bert_dir, capsys, bnb):
    from rankwise.cli import main

    code = main(["train", str(tiny_bert_dir), "--data", str(_binary(tmp_path)), "--rank", "2", "--targets", "query",
                 "--quantize", "4bit", "--quant-type", "fp4", "--compute-dtype", "bfloat16", "--max-steps", "1",
                 "--batch-size", "4", "--max-length", "32", "--device", "cpu", "--out", str(tmp_path / "run"), "-q"])
    assert code == 0, capsys.readouterr().err
    q = json.loads((tmp_path / "run" / "results.json").read_text())["run_info"]["quantization"]
    assert (q["quant_type"], q["compute_dtype"]) == ("fp4", "bfloat16")


def test_heads_found_by_structure_not_by_name():
    """Heads kept in float are the children outside the backbone plus the output embeddings: BART's
    `classification_head` is found although no head list names it; BERT keeps its pooler; Llama its lm_head."""
    from transformers import (BartConfig, BartForSequenceClassification, BertConfig, BertForSequenceClassification,
                              LlamaConfig, LlamaForCausalLM)

    from rankwise.training.quantize import head_modules

    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    with torch.device("meta"):
        bert = BertForSequenceClassification(BertConfig(num_hidden_layers=1, **small))
        bart = BartForSequenceClassification(BartConfig(
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100))
        llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **small))
    assert head_modules(bert) == ["classifier", "bert.pooler"]
    assert head_modules(bart) == ["classification_head"]
    assert head_modules(llama) == ["lm_head"]

