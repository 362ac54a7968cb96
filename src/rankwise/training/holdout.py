"""Held-out training rows: a fixed, seeded set of rows of the training split that no run trains on.

Settings are chosen on these rows (`rankwise sweep` with a `tune:` section, or `train --eval-on dev`), so the
validation split the results report is never used for a choice. The rows depend only on the training file, the
number held out and `dev_seed`, never on the run's `--seed`: every run of a study holds out the same rows.
"""

from __future__ import annotations

from ..types import RankwiseError

__all__ = ["EVAL_ON", "hold_out", "check_eval_on"]

EVAL_ON = ("validation", "dev")


def check_eval_on(eval_on: str, dev_samples: int | None) -> None:
    """--eval-on names a split, and dev needs rows to hold out (checked before any data is read)."""
    if eval_on not in EVAL_ON:
        raise RankwiseError(f"--eval-on must be one of {', '.join(EVAL_ON)}, got {eval_on!r}")
    if eval_on == "dev" and not dev_samples:
        raise RankwiseError("--eval-on dev evaluates on held-out training rows: give --dev-samples N")


def hold_out(train, n: int, dev_seed: int = 0):
    """(train without the held-out rows, the held-out rows): `n` rows drawn with `dev_seed`; the rest keep the
    file's order, so the run's own seeded subsample draws from them as it would from the whole file."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RankwiseError(f"--dev-samples must be a positive integer, got {n!r}")
    if n >= len(train):
        raise RankwiseError(f"--dev-samples {n} leaves no training rows: the training split has {len(train)}")
    import numpy as np

    order = np.random.default_rng(dev_seed).permutation(len(train))
    dev = sorted(order[:n].tolist())
    rest = sorted(order[n:].tolist())
    return train.select(rest), train.select(dev)
