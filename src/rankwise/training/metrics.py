"""Evaluation metrics with numpy and scipy (not `evaluate`, which downloads metric scripts at run time).

Classification metrics are a confusion matrix and scikit-learn's formulas in numpy (tests compare them with
scikit-learn): importing sklearn.metrics cost every run 1.4 s on top of transformers' imports.

binary: accuracy, F1 of class 1, Matthews correlation (CoLA's official metric; robust to class imbalance).
classes: also how many distinct classes were predicted and present (a collapsed model predicts one).
multiclass: accuracy, macro-F1 (every class counts equally, so a majority-class model scores low).
regression: Pearson and Spearman correlation (STS-B's metrics), plus MSE.
causal LM: eval loss and perplexity = exp(loss), computed from the Trainer's loss, not here.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["classification_metrics", "regression_metrics", "metrics_fn", "perplexity"]


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    preds = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    out = {"accuracy": float(np.mean(labels == preds))}
    # distinct classes predicted and present: one predicted class for several true ones is a collapsed model
    out["predicted_classes"] = float(len(np.unique(preds)))
    out["label_classes"] = float(len(np.unique(labels)))
    classes, cm = _confusion(labels, preds)
    if np.asarray(logits).shape[-1] == 2:
        pos = np.flatnonzero(classes == 1)  # F1 of class 1 (sklearn's binary default); 0 when class 1 is absent
        out["f1"] = float(_f1(cm)[pos[0]]) if len(pos) else 0.0
        out["mcc"] = _mcc(cm)
    else:
        out["macro_f1"] = float(np.mean(_f1(cm)))  # over the classes present in labels or predictions
    return out


def _confusion(labels: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes present in either, confusion matrix: rows true, columns predicted), as sklearn builds it."""
    classes, idx = np.unique(np.concatenate([labels.reshape(-1), preds.reshape(-1)]), return_inverse=True)
    t, p = idx[: labels.size], idx[labels.size:]
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return classes, cm


def _f1(cm: np.ndarray) -> np.ndarray:
    """Per-class F1 = 2TP / (2TP + FP + FN); 0 where that is 0/0 (sklearn's zero_division=0)."""
    tp = np.diag(cm).astype(np.float64)
    denom = 2 * tp + (cm.sum(0) - np.diag(cm)) + (cm.sum(1) - np.diag(cm))
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def _mcc(cm: np.ndarray) -> float:
    """Matthews correlation from the confusion matrix (sklearn's multiclass formula); 0 when one side is constant
    (a tiny eval set may hold one class only)."""
    t_sum, p_sum = cm.sum(1).astype(np.float64), cm.sum(0).astype(np.float64)
    n, correct = float(cm.sum()), float(np.trace(cm))
    cov_ytyp = correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n**2 - np.dot(p_sum, p_sum)
    cov_ytyt = n**2 - np.dot(t_sum, t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


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
