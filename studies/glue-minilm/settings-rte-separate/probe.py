"""The untouched model's cosine as an RTE classifier: what `--pair-encoding separate` starts from.

Fits the pair head (a logistic regression on the cosine of the two mean-pooled sentence embeddings) on RTE's
training pairs with every weight of all-MiniLM-L6-v2 frozen, and scores the validation pairs. No LoRA, no training
steps: this is the starting point the study's RTE runs fine-tune from.

    python studies/glue-minilm/settings-rte-separate/probe.py > studies/glue-minilm/settings-rte-separate/probe.json
"""
import json
import math

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from rankwise.assets import minilm_path
from rankwise.training.pairs import encode_separately, fit_head, separate_pairs


def load(split):
    rows = [json.loads(line) for line in open(f"../shared/data/rte/{split}.jsonl")]
    from datasets import Dataset

    enc = encode_separately(tok, [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], 128)
    return Dataset.from_dict({**enc, "labels": [r["label"] for r in rows]})


path = minilm_path()
tok = AutoTokenizer.from_pretrained(path)
model = separate_pairs(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2))
collate = DataCollatorWithPadding(tok)
fit = fit_head(model, load("train"), collate)
val = load("validation")
model.eval()
with torch.no_grad():  # the validation pairs through the model's own (separate-pairs) forward
    batches = [collate([val[j] for j in range(i, min(i + 64, len(val)))]) for i in range(0, len(val), 64)]
    y = torch.cat([b["labels"] for b in batches])
    logits = torch.cat([model(**b).logits for b in batches])
acc = (logits.argmax(1) == y).double().mean().item()
loss = torch.nn.functional.cross_entropy(logits, y).item()
majority = max((y == 0).double().mean().item(), (y == 1).double().mean().item())
print(json.dumps({"fit": fit, "validation": {"accuracy": round(acc, 4), "log_loss": round(loss, 4),
                                             "majority": round(majority, 4), "n": len(y),
                                             "standard_error": round(math.sqrt(acc * (1 - acc) / len(y)), 4)}}))
