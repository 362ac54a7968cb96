"""Task heads: `rankwise train` trains and saves the heads found by structure, and loading knows they are restored."""

from __future__ import annotations

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


def test_outer_heads_are_what_a_backbone_checkpoint_lacks(tmp_path):
    """Reference: transformers' own loading report. Loading a backbone-only checkpoint as a sequence classifier
    initialises anew exactly the parameters under outer_heads (BERT's classifier, BART's classification_head)."""
    from transformers import (BartConfig, BartForSequenceClassification, BartModel, BertConfig,
                              BertForSequenceClassification, BertModel)

    from rankwise.training.quantize import outer_heads

    bert = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                      vocab_size=100)
    bart = BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100)
    for backbone, task_cls, cfg in ((BertModel, BertForSequenceClassification, bert),
                                    (BartModel, BartForSequenceClassification, bart)):
        folder = tmp_path / backbone.__name__
        backbone(cfg).save_pretrained(folder)
        model, info = task_cls.from_pretrained(folder, output_loading_info=True)
        heads = outer_heads(model)
        missing = set(info["missing_keys"])
        under_heads = {n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in heads)}
        assert heads and missing == under_heads, (heads, missing)


@pytest.mark.parametrize("recorded,expected", [
    (["classifier"], True), (["classification_head"], True), ([], False), (None, False), ("classifier", False)])
def test_restores_head_reads_task_json(recorded, expected):
    """A run that recorded restored heads at train time brings them on load (so the base's report of a newly
    initialised head is expected and hidden); a run with none, or written before the key existed, does not."""
    from rankwise.training.runs import restores_head

    task = {"task": "seq-cls"} if recorded is None else {"task": "seq-cls", "restored_heads": recorded}
    assert restores_head(task) is expected
