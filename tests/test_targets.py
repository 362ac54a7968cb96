import re

import pytest

from rankwise.targets import (adaptable_layers, depth_of, match_names, module_type_of, pattern_key,
                              resolve_targets)
from rankwise.types import RankwiseError


def test_all_linear_excludes_heads(bert):
    from conftest import tiny_bert

    names = [lay.name for lay in resolve_targets(tiny_bert("BertForSequenceClassification"))]
    assert len(names) == 2 * 6  # q, k, v, attention.output.dense, intermediate.dense, output.dense per block
    assert not any("classifier" in n or "pooler" in n for n in names)
    assert all(n.startswith("bert.encoder.layer.") for n in names)


def test_llama_all_linear_excludes_lm_head(llama):
    names = [lay.name for lay in resolve_targets(llama, "all-linear")]
    assert len(names) == 2 * 7 and "lm_head" not in names


def test_list_targets_match_name_or_dot_suffix(bert):
    names = [lay.name for lay in resolve_targets(bert, ["query", "attention.self.value"])]
    assert names == [f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    # "output.dense" matches both the attention output and the FFN output: that is peft's suffix semantics
    both = [lay.name for lay in resolve_targets(bert, ["output.dense"])]
    assert len(both) == 4


def test_regex_targets_fullmatch(bert):
    names = [lay.name for lay in resolve_targets(bert, r"encoder\.layer\.1\..*")]
    assert len(names) == 6 and all(".1." in n for n in names)


def test_no_match_lists_what_the_model_has(bert):
    with pytest.raises(RankwiseError) as e:
        resolve_targets(bert, ["q_proj"])
    msg = str(e.value)
    assert "q_proj" in msg and "encoder.layer.N.attention.self.query" in msg and "\n" not in msg


def test_conv1d_shape_is_out_in(gpt2):
    layers = {lay.name: lay for lay in adaptable_layers(gpt2)}
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert c_attn.kind == "conv1d" and c_attn.shape == (96, 32) and c_attn.module_type == "attention"
    assert layers["transformer.h.1.mlp.c_fc"].shape == (128, 32)
    assert layers["transformer.h.1.mlp.c_fc"].module_type == "mlp"


def test_module_type_and_depth():
    assert module_type_of("encoder.layer.3.attention.output.dense") == "attention"
    assert module_type_of("encoder.layer.3.output.dense") == "mlp"
    assert module_type_of("encoder.layer.3.intermediate.dense") == "mlp"
    assert module_type_of("model.layers.0.mlp.down_proj") == "mlp"
    assert module_type_of("model.layers.0.self_attn.o_proj") == "attention"
    assert depth_of("model.layers.17.mlp.up_proj") == 17 and depth_of("pooler.dense") is None


def test_pattern_key_separates_bert_output_dense():
    """The BERT collision: `output.dense` is both the attention output and the FFN output of each block."""
    attn, ffn = "encoder.layer.1.attention.output.dense", "encoder.layer.1.output.dense"
    other_depth = "encoder.layer.11.output.dense"

    def peft_match(key, name):  # exactly how peft's get_pattern_key matches
        return re.match(rf"(.*\.)?({key})$", name) is not None

    assert peft_match(pattern_key(ffn), ffn) and not peft_match(pattern_key(ffn), attn)
    assert not peft_match(pattern_key(ffn), other_depth)
    assert peft_match(pattern_key(ffn), "base_model.model.bert." + ffn)
    assert not peft_match(pattern_key("a.b"), "axb")  # dots are literal


def test_match_names_prefix_and_errors():
    model = ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.0.attention.output.dense"]
    assert match_names(["encoder.layer.0.output.dense"], model) == {
        "encoder.layer.0.output.dense": "bert.encoder.layer.0.output.dense"}
    with pytest.raises(RankwiseError, match="another model"):
        match_names(["model.layers.0.q_proj"], model)
