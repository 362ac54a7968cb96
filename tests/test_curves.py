"""The budget-curve sections of the report: efficiency table and sharing check against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

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


def _runs(task, label, budget, values):
    from rankwise.experiments.results import RunResult

    return [RunResult(f"{task}-{label}-{budget}-s{s}", Path("."), task, label, budget, s,
                      {"train_info": {"lora_params": 1000}, "eval": {"eval_accuracy": v}})
            for s, v in enumerate(values)]


def test_glance_pairs_every_entry_with_its_budgets_reference():
    from scipy import stats

    from rankwise.experiments.curves import _glance_md, glance_rows
    from rankwise.experiments.report import build_cells

    runs = (_runs("t", "uniform_qv", "b1", [0.80, 0.82, 0.81]) + _runs("t", "x", "b1", [0.83, 0.84, 0.82])
            + _runs("t", "uniform", "b2", [0.85, 0.86, 0.87]) + _runs("t", "x", "b2", [0.90, 0.92, 0.91])
            + _runs("t", "y", "b2", [0.85, 0.86, 0.87]) + _runs("t", "uniform_qv", "b2", [0.84, 0.85, 0.86]))
    g = glance_rows(build_cells(runs))["t"]
    assert g["budgets"] == ["b1", "b2"]
    assert g["reference"]["b1"].label == "uniform_qv" and g["reference"]["b2"].label == "uniform"
    md = "\n".join(_glance_md({"t": g}))
    rows = {ln.split(" | ")[0].strip("| "): [c.strip(" |") for c in ln.split(" | ")[1:]]
            for ln in md.splitlines() if ln.startswith("| ")}
    # b1, x - qv per seed (0.03, 0.02, 0.01): mean 0.02, sd 0.01, half t(0.975, 2) 4.302653 * 0.01 / sqrt(3)
    # = 0.024842; b2, x - uniform (0.05, 0.06, 0.04): mean 0.05, the same half width, so it excludes zero
    assert rows["reference"] == ["0.8100 ± 0.0100 (uniform_qv)", "0.8600 ± 0.0100"]
    assert rows["x"] == ["+0.0200 [-0.0048, +0.0448]", "+0.0500 [+0.0252, +0.0748] *"]
    assert rows["y"] == ["-", "same as reference"]
    assert rows["uniform_qv"] == ["(reference)", "-0.0100 on every seed"]
    assert "uniform" not in rows  # only ever the reference: its row is the first
    p1 = stats.ttest_1samp([0.03, 0.02, 0.01], 0).pvalue
    p2 = stats.ttest_1samp([0.05, 0.06, 0.04], 0).pvalue
    assert p2 < p1
    # Holm: the smaller of two p-values times 2
    assert (f"2 comparisons with a test, 1 of them with an interval that excludes zero; the smallest Holm-adjusted "
            f"p is {2 * p2:.3f} (x at b2)") in md


def test_tuning_table_lists_values_in_order_and_marks_the_extended_ones():
    from rankwise.experiments.curves import _tuning_md

    row = lambda lr, score, **kw: {"task": "t", "label": "uniform", "budget": 2, "values": {"lr": lr},  # noqa: E731
                                   "metric": "eval_accuracy", "score": score, "failed": False, **kw}
    tuning = {"spec": {"candidates": {"lr": [5.0e-4, 1.0e-3]}, "methods": {"uniform": {}}, "dev_samples": 8},
              # as the sweep appends them: the written list, then 2.5e-4 (5e-4 won, at the bottom end)
              "table": [row(5.0e-4, 0.8, chosen=True), row(1.0e-3, 0.7), row(2.5e-4, 0.75)]}
    lines = [ln for ln in _tuning_md(tuning) if ln.startswith("| t |")]
    assert lines == ["| t | uniform | 2 | 0.00025 (extended) | eval_accuracy | 0.7500 |",
                     "| t | uniform | 2 | 0.0005 | eval_accuracy | **0.8000** |",
                     "| t | uniform | 2 | 0.001 | eval_accuracy | 0.7000 |"]


def test_eleven_methods_get_eleven_distinguishable_lines(tmp_path):
    """Study v2 compares 11 methods; matplotlib's colour cycle has 10, so the 11th (multirank) once drew in the
    1st's colour and marker. Each line of the Pareto grid must differ from every other in colour, marker or style."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from rankwise.experiments import plots

    series = {f"m{i}": [(1000, 0.5 + 0.01 * i, 0.01), (4000, 0.6, 0.01)] for i in range(11)}
    seen = []
    real_close = plt.close
    plt.close = lambda fig=None: seen.append(fig)  # keep the figure to read its lines back
    try:
        plots.plot_metric_grid([{"title": "t", "metric": "m", "series": series}], tmp_path / "grid")
    finally:
        plt.close = real_close
    lines = [c.lines[0] for c in seen[0].axes[0].containers if c.get_label() in series]  # errorbar: data line
    styles = {(matplotlib.colors.to_hex(ln.get_color()), ln.get_marker(), ln.get_linestyle()) for ln in lines}
    assert len(lines) == 11 and len(styles) == 11
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "grid.pdf").is_file()
