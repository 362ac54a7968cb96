"""Reference loops for the saved-run tests: a run folder loaded with plain transformers + peft (no rankwise), run
one example at a time, and the metrics computed by hand. `rankwise eval/predict/merge` are compared with these.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["plain_peft_classifier", "reference_logits", "hand_binary_metrics", "hand_regression_metrics",
           "assert_metrics_match"]


def plain_peft_classifier(base_dir: str | Path, run_dir: str | Path, num_labels: int):
    """The base checkpoint with a fresh head (as a seq-cls run starts) and the run's adapter, by peft alone."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=num_labels)
    return PeftModel.from_pretrained(base, str(run_dir)).eval()


def reference_logits(model, run_dir: str | Path, texts: list[str], pairs: list[str] | None = None) -> torch.Tensor:
    """Logits one example at a time (no padding at all), with the tokenizer saved in the run folder."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run_dir))
    rows = []
    with torch.no_grad():
        for i, text in enumerate(texts):
            enc = tok(text, pairs[i], return_tensors="pt") if pairs else tok(text, return_tensors="pt")
            rows.append(model(**enc).logits[0])
    return torch.stack(rows)


def hand_binary_metrics(logits: torch.Tensor, labels: list[int]) -> dict[str, float]:
    """Mean cross-entropy, accuracy, F1 of class 1 and Matthews correlation from the confusion counts."""
    y = torch.tensor(labels)
    loss = float(-(logits.double().log_softmax(-1)[torch.arange(len(y)), y]).mean())
    pred = logits.argmax(-1).tolist()
    tp = sum(p == 1 and t == 1 for p, t in zip(pred, labels))
    tn = sum(p == 0 and t == 0 for p, t in zip(pred, labels))
    fp = sum(p == 1 and t == 0 for p, t in zip(pred, labels))
    fn = sum(p == 0 and t == 1 for p, t in zip(pred, labels))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {"eval_loss": loss, "eval_accuracy": (tp + tn) / len(labels),
            "eval_f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
            "eval_mcc": (tp * tn - fp * fn) / denom if denom else 0.0, "predicted": sorted(set(pred))}


def hand_regression_metrics(scores: torch.Tensor, labels: list[float]) -> dict[str, float]:
    """MSE (the eval loss), Pearson from centred sums, Spearman as Pearson of the ranks (no ties here)."""
    p = scores.double().reshape(-1)
    y = torch.tensor(labels, dtype=torch.float64)

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    def ranks(v):
        return torch.argsort(torch.argsort(v)).double()

    assert len(set(labels)) == len(labels) and len(set(p.tolist())) == len(p)  # Spearman without ties
    return {"eval_loss": float(((p - y) ** 2).mean()), "eval_pearson": pearson(p, y),
            "eval_spearman": pearson(ranks(p), ranks(y))}


def assert_metrics_match(got: dict, want: dict, tol: float = 1e-5) -> None:
    for key, value in want.items():
        if key.startswith("eval_"):
            assert math.isclose(got[key], value, rel_tol=tol, abs_tol=tol), (key, got[key], value)
