"""The budget-curve sections of the report: efficiency table and sharing check against hand computations."""

from __future__ import annotations

import math

import pytest

from rankwise.experiments.curves import efficiency_rows, half_width, sharing_rows
from rankwise.experiments.report import Cell


def _cell(label, params, values, metric="eval_accuracy", task="t"):
    c = Cell(task, f"b{params}", label, metric, [])
    c.n = len(values)
    c.mean = sum(values) / len(values)
    c.std = math.sqrt(sum((v - c.mean) ** 2 for v in values) / (len(values) - 1))
    c.lora_params = params
    return c


def test_half_width_is_the_t_interval():
    # n = 5, std 0.01: t(0.975, 4) = 2.776445 (tables), so 2.776445 * 0.01 / sqrt(5) = 0.012416
    assert half_width(0.01, 5) == pytest.approx(0.012416, abs=1e-6)
    assert math.isnan(half_width(0.01, 1))


def test_efficiency_finds_the_smallest_budget_that_reaches_uniforms_best():
    cells = [_cell("uniform", 1000, [0.80, 0.81, 0.82]), _cell("uniform", 4000, [0.84, 0.85, 0.86]),
             _cell("uniform", 16000, [0.83, 0.84, 0.85]),
             _cell("spectral", 1000, [0.82, 0.83, 0.84]), _cell("spectral", 4000, [0.845, 0.85, 0.855]),
             _cell("depth", 1000, [0.70, 0.71, 0.72]), _cell("depth", 4000, [0.75, 0.76, 0.77])]
    rows = {r["method"]: r for r in efficiency_rows(cells)}
    # uniform's best: 0.85 at 4000, std 0.01, n 3: half width t(0.975, 2) = 4.302653 * 0.01 / sqrt(3) = 0.024842
    bar = 0.85 - 0.024842
    assert rows["uniform"]["target"] == pytest.approx(bar, abs=1e-6)
    assert rows["spectral"]["reaches_at"] == 1000 and rows["spectral"]["saves"] == 3000  # 0.83 >= 0.8252
    assert rows["spectral"]["saves_ratio"] == pytest.approx(4.0)
    assert rows["uniform"]["reaches_at"] == 4000 and rows["uniform"]["saves"] == 0  # 0.81 < 0.8252 at 1000
    assert rows["depth"]["reaches_at"] is None


def test_efficiency_for_a_loss_looks_down():
    cells = [_cell("uniform", 10, [2.0, 2.1, 2.2], "eval_loss"), _cell("uniform", 40, [1.5, 1.6, 1.7], "eval_loss"),
             _cell("uniform", 160, [1.8, 1.9, 2.0], "eval_loss"), _cell("x", 10, [1.6, 1.65, 1.7], "eval_loss")]
    rows = {r["method"]: r for r in efficiency_rows(cells)}
    # bar = 1.6 + 4.302653 * 0.1 / sqrt(3) = 1.848414; x's 1.65 is below it at 10 parameters
    assert rows["x"]["target"] == pytest.approx(1.848414, abs=1e-6) and rows["x"]["reaches_at"] == 10


def test_sharing_rows_compare_own_choice_with_the_shared_one():
    tuning = {"spec": {"verify": {"sst2": ["gradient"]}, "share": {"gradient": ["uniform", "uniform_qv"]}},
              "table": [
                  {"task": "sst2", "label": "uniform", "budget": "41472", "values": {"lr": 0.002}, "chosen": True},
                  {"task": "sst2", "label": "uniform_qv", "budget": "9216", "values": {"lr": 0.004}, "chosen": True},
                  {"task": "sst2", "label": "gradient", "budget": "41472", "values": {"lr": 0.002}, "chosen": True},
                  {"task": "sst2", "label": "gradient", "budget": "9216", "values": {"lr": 0.001}, "chosen": True},
                  {"task": "sst2", "label": "gradient", "budget": "9216", "values": {"lr": 0.004}}]}
    rows = {r["budget"]: r for r in sharing_rows(tuning)}
    assert rows["41472"]["same"] and rows["41472"]["shared"] == {"lr": 0.002}
    assert not rows["9216"]["same"] and rows["9216"]["shared"] == {"lr": 0.004}  # uniform has no 9216: qv's
