"""Evaluation metrics with scikit-learn/scipy (not `evaluate`, which downloads metric scripts at run time).

binary: accuracy, F1 of class 1, Matthews correlation (CoLA's official metric; robust to class imbalance).
classes: also how many distinct classes were predicted and present (a collapsed model predicts one).
multiclass: accuracy, macro-F1 (every class counts equally, so a majority-class model scores low).
regression: Pearson and Spearman correlation (STS-B's metrics), plus MSE.
causal LM: eval loss and perplexity = exp(loss), computed from the Trainer's loss, not here.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["classification_metrics", "regression_metrics", "metrics_fn", "perplexity"]


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    out = {"accuracy": float(accuracy_score(labels, preds))}
    # distinct classes predicted and present: one predicted class for several true ones is a collapsed model
    out["predicted_classes"] = float(len(np.unique(preds)))
    out["label_classes"] = float(len(np.unique(labels)))
    if np.asarray(logits).shape[-1] == 2:
        out["f1"] = float(f1_score(labels, preds, zero_division=0))
        with warnings.catch_warnings():  # a tiny eval set may hold one class only: MCC is then 0, say nothing
            warnings.simplefilter("ignore", UserWarning)
            out["mcc"] = float(matthews_corrcoef(labels, preds))
    else:
        out["macro_f1"] = float(f1_score(labels, preds, average="macro", zero_division=0))
    return out


def regression_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    preds = np.asarray(preds, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    out = {"mse": float(np.mean((preds - labels) ** 2))}
    # A constant prediction has no correlation; report 0 instead of scipy's NaN plus a warning.
    if np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return {"pearson": 0.0, "spearman": 0.0, **out}
    return {"pearson": float(pearsonr(preds, labels)[0]), "spearman": float(spearmanr(preds, labels)[0]), **out}


def metrics_fn(label_type: str):
    """A Trainer `compute_metrics` for the label type ("class" or "regression")."""

    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        if label_type == "regression":
            return regression_metrics(logits, labels)
        return classification_metrics(logits, labels)

    return compute


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run reports inf rather than overflowing."""
    return float(math.exp(loss)) if loss < 700 else float("inf")
