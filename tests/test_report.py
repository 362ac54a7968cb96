"""`rankwise report` on synthetic results.json files: numbers checked against numpy/scipy computed here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import require
from scipy import stats

from rankwise.cli import main
from rankwise.experiments.report import build_cells, holm, paired_t, summarize
from rankwise.experiments.results import collect

SEEDS = [0, 1, 2, 3]
# metric per (method, seed): "good" beats uniform by ~0.05 on every seed; "noisy" is better on average, not reliably
VALUES = {
    "uniform": [0.70, 0.72, 0.69, 0.71],
    "good": [0.75, 0.78, 0.73, 0.77],
    "noisy": [0.80, 0.64, 0.77, 0.70],
    "costly": [0.90, 0.91, 0.92, 0.93],  # spends 5% more parameters: must not be compared
}
PARAMS = {"uniform": 10_000, "good": 9_950, "noisy": 10_000, "costly": 10_500}


# where each seed trained: seed 0 predates the hardware record, seed 3 ran on a GPU
MACHINES = {0: ("cpu", None), 1: ("cpu", {"cpus": 2}), 2: ("cpu", {"cpus": 2}),
            3: ("cuda", {"cpus": 16, "gpu": "NVIDIA H200"})}


def _results(method: str, seed: int, value: float) -> dict:
    device, hardware = MACHINES[seed]
    return {
        "schema": 1,
        "run_info": {"model": "tiny", "task": "seq-cls", "data": "/data/toy", "method": "lora", "strategy": method,
                     "budget": {"params": 10_000, "spec": "rank 4"}, "seed": seed, "device": device,
                     **({"hardware": hardware} if hardware else {}),
                     "versions": {"rankwise": "0.1.0", "torch": "x"}, "command": f"rankwise train ... --seed {seed}"},
        "train_info": {"lora_params": PARAMS[method], "trainable_params": PARAMS[method] + 10,
                       "wall_time_s": 10.0 + seed, "peak_memory_bytes": (100 + seed) * 2**20,
                       "loss_curve": [{"step": s, "loss": 1.0 / (s + seed + 1)} for s in range(1, 6)],
                       # --eval-steps 2: evaluations at steps 2 and 4 (and the final one, which eval holds)
                       "eval_curve": [{"step": s, "eval_loss": 0.7, "eval_accuracy": value - 0.1 / s}
                                      for s in (2, 4)]},
        "eval": {"eval_accuracy": value, "eval_mcc": value - 0.5},
    }


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    runs = []
    for method, values in VALUES.items():
        for seed, v in zip(SEEDS, values):
            rid = f"toy-{method}-r4-s{seed}-abcd1234"
            d = root / "runs" / rid
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(_results(method, seed, v)))
            runs.append({"id": rid, "task": "toy", "label": method, "budget": 4, "seed": seed})
    (root / "sweep.json").write_text(json.dumps({
        "schema": 1, "command": "rankwise sweep exp.yaml --out sweep", "host": "test host",
        "experiment": {"name": "synthetic", "metrics": {"toy": "eval_accuracy"}},
        "experiment_text": "name: synthetic\n", "runs": runs}))
    return root


def test_summary_and_paired_t_match_numpy_and_scipy():
    a, b = VALUES["good"], VALUES["uniform"]
    mean, std, n = summarize(a)
    assert n == 4 and mean == pytest.approx(np.mean(a)) and std == pytest.approx(np.std(a, ddof=1))
    got = paired_t(a, b)
    d = np.subtract(a, b)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert got["diff"] == pytest.approx(d.mean())
    assert (got["lo"], got["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert got["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    # one pair: no interval, no test
    one = paired_t([1.0], [0.5])
    assert one["diff"] == 0.5 and math.isnan(one["lo"]) and math.isnan(one["p"])


def test_holm_matches_a_hand_computation():
    # sorted p: 0.005, 0.01, 0.03, 0.04 (m = 4) -> 4*0.005 = 0.02, 3*0.01 = 0.03, 2*0.03 = 0.06, then 1*0.04 = 0.04
    # is raised to 0.06 (adjusted p never fall along the order); 0.5 * 5 caps at 1; nan is not a test
    got = holm([0.01, 0.04, math.nan, 0.03, 0.005])
    assert got[:2] == [pytest.approx(0.03), pytest.approx(0.06)]
    assert math.isnan(got[2]) and got[3:] == [pytest.approx(0.06), pytest.approx(0.02)]
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([]) == []


def test_cells_compare_within_tolerance_and_bold_only_when_interval_excludes_zero(sweep_dir):
    runs, notes = collect(sweep_dir)
    assert len(runs) == 16 and notes == []
    cells = {c.label: c for c in build_cells(runs, {"toy": "eval_accuracy"}, tolerance=0.02)}
    assert cells["uniform"].cmp is None and cells["uniform"].refused == ""
    # 9,950 vs 10,000 is -0.5%: compared; 10,500 is +5%: refused, with both numbers named
    assert cells["good"].cmp is not None
    assert cells["costly"].cmp is None
    assert "10,500" in cells["costly"].refused and "10,000" in cells["costly"].refused
    assert cells["good"].bold and not cells["noisy"].bold and not cells["costly"].bold
    noisy = np.subtract(VALUES["noisy"], VALUES["uniform"])
    assert cells["noisy"].cmp["lo"] < 0 < cells["noisy"].cmp["hi"]
    assert cells["noisy"].cmp["p"] == pytest.approx(stats.ttest_rel(VALUES["noisy"], VALUES["uniform"]).pvalue)
    assert cells["noisy"].cmp["diff"] == pytest.approx(noisy.mean())
    # two comparisons in the task (good, noisy): Holm doubles the smaller p, and the larger stays at least that
    p_good, p_noisy = cells["good"].cmp["p"], cells["noisy"].cmp["p"]
    assert p_good < p_noisy
    assert cells["good"].cmp["p_holm"] == pytest.approx(min(1, 2 * p_good))
    assert cells["noisy"].cmp["p_holm"] == pytest.approx(max(min(1, 2 * p_good), p_noisy))
    # a looser tolerance lets the costly method in
    loose = {c.label: c for c in build_cells(runs, {"toy": "eval_accuracy"}, tolerance=0.06)}
    assert loose["costly"].cmp is not None and loose["costly"].bold


def test_report_regenerates_from_result_files_alone(sweep_dir, tmp_path, capsys):
    require("matplotlib", "the figures need matplotlib: pip install -e '.[plot]'")
    out = tmp_path / "report"
    assert main(["report", str(sweep_dir), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    tex = (out / "tables.tex").read_text()
    # hand-computed numbers appear in both tables
    good = f"{np.mean(VALUES['good']):.4f} ± {np.std(VALUES['good'], ddof=1):.4f}"
    assert f"**{good}**" in md
    tex_good = good.replace("±", "$\\pm$")
    assert "\\textbf{" + tex_good + "}" in tex
    for s in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert s in tex
    assert "costly" in md.split("## Not compared")[1]
    # each cell traces to its run folders; environment and commands are stated
    assert "runs/toy-good-r4-s3-abcd1234" in md and "rankwise sweep exp.yaml --out sweep" in md
    # the report's own command is the one main() was given, not the host process's argv (here, pytest's)
    assert f"\nrankwise report {sweep_dir} --out {out}\n" in md and "test_report.py" not in md.split("## Commands")[1]
    assert "test host" in md and "torch x" in md
    assert "- toy trained on: cpu (CPU, 2 cores); cpu (machine not recorded); cuda (NVIDIA H200)" in md
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert len([f for f in figs if f.endswith(".png")]) >= 2 and len([f for f in figs if f.endswith(".pdf")]) >= 2
    assert {"loss-toy-r4.png", "eval-toy-r4.png", "eval-toy-r4.pdf"} <= set(figs)  # validation curve drawn
    cells = json.loads((out / "cells.json").read_text())
    good_cell = next(c for c in cells if c["method"] == "good")
    assert good_cell["values"] == VALUES["good"] and len(good_cell["runs"]) == 4
    # the same input gives the same tables and byte-identical figures (no creation date in the PDFs), so a
    # committed report changes only where its numbers do
    before = tex
    assert main(["report", str(sweep_dir), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "tables.tex").read_text() == before
    for f in figs:
        assert (tmp_path / "again" / "figures" / f).read_bytes() == (out / "figures" / f).read_bytes(), f


def test_validation_curve_is_the_task_metric_averaged_over_seeds(sweep_dir):
    from rankwise.experiments.figures import _mean_curve

    runs, _ = collect(sweep_dir)
    good = sorted((r for r in runs if r.label == "good"), key=lambda r: r.seed)
    steps, values = _mean_curve(good, "eval_curve", "eval_accuracy")
    # hand: each seed logs value - 0.1 / step at steps 2 and 4
    assert steps == [2, 4]
    assert values == [pytest.approx(np.mean(VALUES["good"]) - 0.05), pytest.approx(np.mean(VALUES["good"]) - 0.025)]
    # runs without --eval-steps have no curve: nothing to draw, no error
    assert _mean_curve(good, "eval_curve", "eval_mcc") == ([], [])


def test_report_without_manifest_and_unfinished_runs(sweep_dir, tmp_path):
    (sweep_dir / "sweep.json").unlink()
    bad = sweep_dir / "runs" / "broken"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    runs, notes = collect(sweep_dir)
    assert len(runs) == 16 and any("not valid JSON" in n for n in notes)
    assert {r.label for r in runs} == set(VALUES) and {r.budget for r in runs} == {"r4"}
    # runs labelled from run_info; the task is the data folder's name
    assert {r.task for r in runs} == {"toy"}


def test_a_sweep_under_way_lists_started_runs_and_counts_the_rest(sweep_dir):
    """Runs of the grid without a folder have not started: one counted line per sweep, not a line each (a study
    under way has hundreds); a folder without a complete results.json (running, or killed) is listed by id."""
    m = json.loads((sweep_dir / "sweep.json").read_text())
    m["tuning"] = {"pending_grid_runs": 7}  # a tuned sweep lists a grid run once its settings are chosen
    m["runs"] += [{"id": f"toy-later-r4-s{s}-abcd1234", "task": "toy", "label": "later", "budget": 4, "seed": s}
                  for s in SEEDS] + [{"id": "other-x-r4-s0-abcd1234", "task": "other", "label": "x", "budget": 4,
                                      "seed": 0}]
    (sweep_dir / "sweep.json").write_text(json.dumps(m))
    (sweep_dir / "runs" / "toy-later-r4-s0-abcd1234").mkdir()  # started: its folder, no results yet
    runs, notes = collect(sweep_dir)
    assert len(runs) == 16
    assert notes == ["toy-later-r4-s0-abcd1234: not finished (no complete results.json)",
                     "4 runs of the grid have not started yet (toy: 3, other: 1)",
                     "7 more grid runs wait for their tuning cells' choices"]


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_dynamic_methods_compare_by_their_final_adapter(sweep_dir, tmp_path):
    """An AdaLoRA-like run trains 15,000 LoRA parameters, prunes to 10,000: compared with uniform (10,000) by the
    final count, and the report says how many it started with. A final count 5% off is still refused."""
    for seed in SEEDS:
        d = sweep_dir / "runs" / f"toy-costly-r4-s{seed}-abcd1234"
        r = json.loads((d / "results.json").read_text())
        r["train_info"]["lora_params"] = 15_000
        r["method_info"] = {"final_lora_params": 10_000 if seed else 10_600}
        (d / "results.json").write_text(json.dumps(r))
    runs, _ = collect(sweep_dir)
    cells = {c.label: c for c in build_cells(runs, {"toy": "eval_accuracy"}, tolerance=0.02)}
    assert "10,600" in cells["costly"].refused  # seed 0's final adapter is 6% over
    for seed in SEEDS:  # now every final adapter matches
        d = sweep_dir / "runs" / f"toy-costly-r4-s{seed}-abcd1234"
        r = json.loads((d / "results.json").read_text())
        r["method_info"]["final_lora_params"] = 10_000
        (d / "results.json").write_text(json.dumps(r))
    runs, _ = collect(sweep_dir)
    cells = {c.label: c for c in build_cells(runs, {"toy": "eval_accuracy"}, tolerance=0.02)}
    assert cells["costly"].cmp is not None and cells["costly"].lora_params == 10_000
    assert main(["report", str(sweep_dir), "--out", str(tmp_path / "rep"), "--no-figures"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Dynamic budgets" in md and "up to 15,000 during training" in md
