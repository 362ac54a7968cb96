"""TRAIN: fine-tune with a rankwise plan on transformers' Trainer + peft, then evaluate, merge or predict.

    from rankwise.training import train, evaluate_run, merge_run, predict
    results = train("minilm", "data/sst2", preset="balanced", max_train_samples=3000, out="runs/sst2")
    evaluate_run("runs/sst2", "data/sst2")
    predict("runs/sst2", "a charming film")   # [{"label": ..., "score": ...}]
"""

from __future__ import annotations

from .run import train
from .runs import evaluate_run, load_run, merge_run, predict

__all__ = ["train", "evaluate_run", "merge_run", "predict", "load_run"]
