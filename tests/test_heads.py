"""Task heads: `rankwise train` trains and saves the heads found by structure, and loading knows they are restored."""

from __future__ import annotations

import json

import pytest
import torch


def test_plain_training_trains_the_same_heads():
    """`rankwise train` (not only QLoRA) trains and saves the heads found by structure: BART's
    classification_head, which a list of head names missed, and BERT's pooler beside its classifier."""
    from peft import LoraConfig, get_peft_model
    from transformers import BartConfig, BartForSequenceClassification, BertConfig, BertForSequenceClassification

    from rankwise.training.run import _lora_kwargs

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=100))
    bart = BartForSequenceClassification(BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100))
    for model, target, heads in ((bert, "query", ("classifier.", "bert.pooler.")),
                                 (bart, "q_proj", ("classification_head.",))):
        kw = _lora_kwargs("seq-cls", model, "unused", 0.0)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[target], **kw))
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n}
        for head in heads:  # every parameter of each head has a trained copy
            base = [n for n, _ in model.named_parameters() if n.startswith(head) and "original_module" in n]
            assert base, head
            copies = {"base_model.model." + n.replace("original_module", "modules_to_save.default") for n in base}
            assert copies <= trainable, head


@pytest.mark.parametrize("saved,expected", [
    (["classifier", "bert.pooler"], True), (["classification_head"], True), (["score"], True),
    (["bert.pooler"], False), ([], False), (None, False)])
def test_restores_head_reads_the_saved_modules(tmp_path, saved, expected):
    """A run whose adapter saved a head outside the backbone restores it on load (so the base's report of a newly
    initialised head is expected and hidden); a pooler alone is no head."""
    from rankwise.training.runs import restores_head

    (tmp_path / "adapter_config.json").write_text(json.dumps({"modules_to_save": saved}))
    assert restores_head(tmp_path) is expected

