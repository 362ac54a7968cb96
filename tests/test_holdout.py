"""Held-out training rows (`--dev-samples`, `--eval-on dev`): which rows, and the one-line errors."""

from __future__ import annotations

import pytest

from rankwise.training.holdout import check_eval_on, hold_out
from rankwise.types import RankwiseError


def test_held_out_rows_are_fixed_by_the_file_n_and_dev_seed_only():
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(50)], "label": [i % 2 for i in range(50)]})
    rest, dev = hold_out(train, 10, dev_seed=0)
    again_rest, again_dev = hold_out(train, 10, dev_seed=0)
    other_rest, other_dev = hold_out(train, 10, dev_seed=1)
    assert len(dev) == 10 and len(rest) == 40
    assert set(dev["text"]).isdisjoint(rest["text"]) and set(dev["text"]) | set(rest["text"]) == set(train["text"])
    assert dev["text"] == again_dev["text"] and rest["text"] == again_rest["text"]  # the same rows every run
    assert dev["text"] != other_dev["text"]  # another dev_seed, other rows
    # the rest keep the file's order, so a run's own seeded subsample draws from them as from the whole file
    assert rest["text"] == sorted(rest["text"], key=lambda t: int(t.split()[1]))


@pytest.mark.parametrize("n,message", [(0, "must be a positive integer"), (True, "must be a positive integer"),
                                       (50, "leaves no training rows: the training split has 50")])
def test_bad_dev_samples(n, message):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"text": ["x"] * 50})
    with pytest.raises(RankwiseError, match=message):
        hold_out(train, n)


def test_eval_on_names_a_split_and_dev_needs_rows():
    check_eval_on("validation", None)
    check_eval_on("dev", 500)
    with pytest.raises(RankwiseError, match="--eval-on must be one of validation, dev, got 'test'"):
        check_eval_on("test", 500)
    with pytest.raises(RankwiseError, match="give --dev-samples N"):
        check_eval_on("dev", None)
