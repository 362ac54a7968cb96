"""The tune: section of an experiment: settings chosen on held-out training rows, never on validation.

A tiny saved BERT and a learnable toy task: one learning rate that learns (planted) against one that cannot move
the weights (1e-9). The choice must be the candidate with the best held-out score (checked against the scores read
from each tuning run's own results.json), must not change when the validation labels are corrupted, and a sweep
killed with SIGKILL resumes without redoing a finished tuning cell.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from rankwise.experiments.spec import load_experiment
from rankwise.types import RankwiseError
from test_sweep import _env, assets, attempts, events, sweep_cmd, write_exp  # noqa: F401 (assets: a fixture)
from test_training_fixtures import sentences, write_csv

TUNE = ("tune:\n  candidates: {lr: [1.0e-9, 1.0e-2]}\n  methods: {uniform: {}}\n  share: {depth: uniform}\n"
        "  dev_samples: 8\n")


def _exp(tmp_path, assets, data=None, extra=TUNE, methods="[uniform, depth]"):
    exp = write_exp(tmp_path / "exp.yaml", assets, methods=methods, extra=extra)
    text = exp.read_text().replace("max_steps: 2", "max_steps: 60")
    if data is not None:
        text = text.replace(str(assets / "data"), str(data))
    exp.write_text(text.replace("toy: {data: ", "toy: {metric: eval_loss, data: "))
    return exp


def _manifest(out):
    return json.loads((out / "sweep.json").read_text())


def _scores(out, table):
    """Mean held-out loss per candidate, read from the tuning runs' own results.json files (negated: higher is
    better, as for the choice)."""
    got = {}
    for row in table:
        losses = [json.loads((out / "tuning" / rid / "results.json").read_text())["eval"] for rid in row["runs"]]
        assert all(e["split"] == "dev" and e["num_samples"] == 8 for e in losses)
        got[row["values"]["lr"]] = -sum(e["eval_loss"] for e in losses) / len(losses)
    return got


def test_tuning_picks_the_best_held_out_value_and_never_reads_validation(tmp_path, assets):
    from rankwise.experiments.sweep import sweep

    out = tmp_path / "out"
    summary = sweep(_exp(tmp_path, assets), out, progress=False)
    assert summary["failed"] == [] and summary["ran"] == 2 + 2  # 2 tuning cells, uniform and depth in the grid
    m = _manifest(out)
    table = m["tuning"]["table"]
    scores = _scores(out, table)
    best = max(scores, key=lambda lr: (scores[lr], -list(scores).index(lr)))
    assert best == 1.0e-2 and scores[1.0e-2] > scores[1.0e-9]  # the planted value learns, 1e-9 cannot
    assert m["tuning"]["choices"] == [{"task": "toy", "label": "uniform", "budget": 2, "values": {"lr": best}}]
    for run in m["runs"]:  # both grid cells train with the choice, on the data minus the held-out rows
        args = run["args"]
        assert args[args.index("--lr") + 1] == str(best) and args[args.index("--dev-samples") + 1] == "8"
        assert "--eval-on" not in args
        r = json.loads((out / "runs" / run["id"] / "results.json").read_text())
        assert r["eval"]["split"] == "validation" and r["train_info"]["train_samples"] == 32 - 8

    # the same sweep on data whose validation labels are all flipped: the same held-out scores, the same choice
    data = tmp_path / "flipped"
    rows = [[t, y] for t, y in sentences(40)]
    write_csv(data / "train.csv", ["text", "label"], rows[:32])
    write_csv(data / "validation.csv", ["text", "label"], [[t, 1 - y] for t, y in rows[32:]])
    out2 = tmp_path / "out2"
    sweep(_exp(tmp_path / "b", assets, data=data), out2, progress=False)
    m2 = _manifest(out2)
    assert _scores(out2, m2["tuning"]["table"]) == scores
    assert m2["tuning"]["choices"][0]["values"] == {"lr": best}


def test_killed_sweep_keeps_finished_tuning_cells(tmp_path, assets):
    exp = _exp(tmp_path, assets, methods="[uniform]",
               extra=TUNE.replace("[1.0e-9, 1.0e-2]", "[1.0e-9, 1.0e-2, 3.0e-3]").replace("  share: {depth: uniform}\n",
                                                                                         ""))
    out = tmp_path / "out"
    proc = subprocess.Popen(sweep_cmd(exp, out, "--jobs", "1"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(a["event"] == "done" for a in attempts(out)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [a["run"] for a in attempts(out) if a["event"] == "done"]
    assert finished, "no tuning cell finished before the kill"
    stamp = (out / "tuning" / finished[0] / "results.json").stat().st_mtime_ns
    assert subprocess.run(sweep_cmd(exp, out, "--jobs", "2"), env=_env(), capture_output=True).returncode == 0
    assert events(out, finished[0], "start") == 1  # never started again
    assert (out / "tuning" / finished[0] / "results.json").stat().st_mtime_ns == stamp
    m = _manifest(out)
    assert len(m["tuning"]["runs"]) == 3 and len(m["tuning"]["choices"]) == 1 and len(m["runs"]) == 1
    assert sorted(p.name for p in (out / "tuning").iterdir()) == sorted(r["id"] for r in m["tuning"]["runs"])


@pytest.mark.parametrize("tune,message", [
    ("tune:\n  candidates: {lr: []}\n  methods: {uniform: {}}\n", "tune.candidates.lr: give a non-empty list"),
    ("tune:\n  candidates: {model: [a]}\n  methods: {uniform: {}}\n", "tune.candidates.model: not a tunable"),
    ("tune:\n  candidates: {lr: [1.0e-3]}\n  methods: {uniform: {}}\n", "grid entry 'depth' is neither tuned"),
    ("tune:\n  candidates: {lr: [1.0e-3]}\n  methods: {uniform: {}}\n  share: {depth: spectral}\n",
     "'spectral' is not tuned"),
    ("tune:\n  candidates: {lr: [-1]}\n  methods: {uniform: {}, depth: {}}\n", "candidates must be positive"),
    ("tune:\n  candidates: {lr: [1.0e-3]}\n  methods: {uniform: {}, depth: {}}\n  dev_samples: 0\n",
     "tune.dev_samples: must be an integer >= 1"),
    ("tune:\n  candidates: {lr: [1.0e-3]}\n  methods: {nope: {}}\n", "tune.methods.nope: not a label"),
    ("tune:\n  candidates: {lr: [1.0e-3]}\n  methods: {uniform: {}, depth: {}}\n  colour: red\n",
     "tune.colour: unknown key"),
])
def test_bad_tune_entries_fail_with_one_line(tmp_path, assets, tune, message):
    exp = _exp(tmp_path, assets, extra=tune)
    with pytest.raises(RankwiseError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_experiment(exp)
    assert "\n" not in str(info.value)


def test_changing_a_candidate_list_renews_only_the_cells_it_touches(tmp_path, assets):
    first = {r.id for r in load_experiment(_exp(tmp_path, assets)).tuning_runs()}
    wider = TUNE.replace("methods: {uniform: {}}", "methods: {uniform: {}, depth: {lr: [1.0e-3]}}").replace(
        "  share: {depth: uniform}\n", "")
    second = {r.id: r for r in load_experiment(_exp(tmp_path / "b", assets, extra=wider)).tuning_runs()}
    assert first <= set(second)  # uniform's cells keep their ids
    assert {r.label for k, r in second.items() if k not in first} == {"depth"}


# ----- tune.extend: a best value at the edge of its list gets the next one beyond it --------------------------------

EXTEND = ("tune:\n  candidates: {lr: [1.0e-3, 2.0e-3]}\n  methods: {uniform: {}}\n  extend: {lr: 2}\n"
          "  seeds: [0, 1]\n  dev_samples: 8\n")


def _grow(monkeypatch, exp, loss_of, failed=(), unfinished=()):
    """tuning_cells with held-out scores planted by lr (no training): each cell's eval_loss is loss_of(lr);
    lrs in `failed` fail, those in `unfinished` have not finished."""
    import rankwise.experiments.tuning as tuning

    def planted(cells, out):
        out = {}
        for c in cells:
            lr = c.candidate["lr"]
            if lr in unfinished:
                continue
            out[c.id] = {"failed": True} if lr in failed else {"eval_loss": loss_of(lr), "split": "dev"}
        return out

    monkeypatch.setattr(tuning, "_scores_on_disk", planted)
    return tuning.tuning_cells(exp, None)


@pytest.mark.parametrize("best,tried,chosen", [
    # rising to the top: 4e-3 (2e-3 x 2), then 8e-3; the limit (2 beyond the list) stops it there
    (8.0e-3, [1.0e-3, 2.0e-3, 4.0e-3, 8.0e-3], 8.0e-3),
    (1.0, [1.0e-3, 2.0e-3, 4.0e-3, 8.0e-3], 8.0e-3),
    # falling to the bottom: 5e-4, then 2.5e-4, which loses to 5e-4: 5e-4 is no longer at an end
    (6.0e-4, [2.5e-4, 5.0e-4, 1.0e-3, 2.0e-3], 5.0e-4),
    # near the bottom but not beyond it: 1e-3 wins (an end), 5e-4 is tried and loses, so 1e-3 stays inside
    (1.4e-3, [5.0e-4, 1.0e-3, 2.0e-3], 1.0e-3),
])
def test_extend_adds_values_beyond_an_end_while_the_end_wins(tmp_path, assets, monkeypatch, best, tried, chosen):
    import math

    exp = load_experiment(_exp(tmp_path, assets, extra=EXTEND, methods="[uniform]"))
    cells, choices, table = _grow(monkeypatch, exp, lambda lr: (math.log(lr / best)) ** 2)
    assert sorted({c.candidate["lr"] for c in cells}) == pytest.approx(tried)
    assert len(cells) == 2 * len(tried)  # every value on both tuning seeds
    assert choices == {("toy", "uniform", 2): {"lr": pytest.approx(chosen)}}
    assert [r["values"]["lr"] for r in table if r.get("chosen")] == [pytest.approx(chosen)]


def test_extend_stops_at_a_value_that_fails_and_waits_for_unfinished_cells(tmp_path, assets, monkeypatch):
    import math

    exp = load_experiment(_exp(tmp_path, assets, extra=EXTEND, methods="[uniform]"))
    loss = lambda lr: (math.log(lr / 1.0)) ** 2  # noqa: E731 (always wants more)
    cells, choices, _ = _grow(monkeypatch, exp, loss, failed={4.0e-3})  # 4e-3 diverged: 2e-3 stays the choice
    assert sorted({c.candidate["lr"] for c in cells}) == [1.0e-3, 2.0e-3, 4.0e-3]
    assert choices == {("toy", "uniform", 2): {"lr": 2.0e-3}}
    cells, choices, _ = _grow(monkeypatch, exp, loss, unfinished={4.0e-3})  # not finished: no choice yet
    assert sorted({c.candidate["lr"] for c in cells}) == [1.0e-3, 2.0e-3, 4.0e-3] and choices == {}
    assert all(r.pending for r in exp.runs(choices))  # so the grid waits for it


@pytest.mark.parametrize("extend,message", [
    ("  extend: {lora_alpha: 1}\n", "tune.extend.lora_alpha: not a tuned key (tuned: lr)"),
    ("  extend: {lr: -1}\n", "tune.extend.lr: give how many values may be added beyond each end"),
    ("  extend: {lr: true}\n", "tune.extend.lr: give how many"),
])
def test_bad_extend_fails_with_one_line(tmp_path, assets, extend, message):
    import re

    with pytest.raises(RankwiseError, match=re.escape(message)) as info:
        load_experiment(_exp(tmp_path, assets, extra=EXTEND.replace("  extend: {lr: 2}\n", extend),
                             methods="[uniform]"))
    assert "\n" not in str(info.value)


def test_extend_needs_two_numbers_to_continue_their_spacing(tmp_path, assets):
    one = EXTEND.replace("[1.0e-3, 2.0e-3]", "[1.0e-3]")
    with pytest.raises(RankwiseError, match=r"tune.extend.lr: needs at least two positive numbers"):
        load_experiment(_exp(tmp_path, assets, extra=one, methods="[uniform]"))


def test_a_sweep_runs_the_extension_its_tuning_calls_for_and_resumes_without_rerunning(tmp_path, assets):
    """Real runs: two candidates, one of them is best, so it is at an end and one more value is tried beyond it
    (limit 1), then the grid trains with the best of the three, read here from the runs' own results.json."""
    from rankwise.experiments.sweep import sweep

    tune = EXTEND.replace("extend: {lr: 2}", "extend: {lr: 1}").replace("seeds: [0, 1]", "seeds: [0]")
    exp = _exp(tmp_path, assets, extra=tune, methods="[uniform]")
    exp.write_text(exp.read_text().replace("max_steps: 60", "max_steps: 8"))
    out = tmp_path / "out"
    summary = sweep(exp, out, progress=False)
    assert summary["failed"] == [] and summary["ran"] == 3 + 1
    m = _manifest(out)
    runs = m["tuning"]["runs"]
    assert len(runs) == 3 and sorted(p.name for p in (out / "tuning").iterdir()) == sorted(r["id"] for r in runs)
    scores = _scores(out, m["tuning"]["table"])
    first = max([1.0e-3, 2.0e-3], key=lambda lr: (scores[lr], -[1.0e-3, 2.0e-3].index(lr)))
    assert set(scores) == {1.0e-3, 2.0e-3, {1.0e-3: 5.0e-4, 2.0e-3: 4.0e-3}[first]}
    best = max(scores, key=lambda lr: (scores[lr], -list(scores).index(lr)))
    assert m["tuning"]["choices"][0]["values"] == {"lr": best}
    args = m["runs"][0]["args"]
    assert float(args[args.index("--lr") + 1]) == best
    again = sweep(exp, out, progress=False)
    assert again["ran"] == 0 and again["skipped"] == 4


# ----- share: [uniform, own]: uniform's choice where uniform runs, tuned on its own elsewhere -----------------------

OWN_TUNE = ("tune:\n  candidates: {lr: [1.0e-3, 2.0e-3, 4.0e-3]}\n  methods: {uniform: {}}\n"
            "  share: {depth: [uniform, own]}\n  dev_samples: 8\n")
OWN_METHODS = "[{strategy: uniform, budgets: [4]}, depth]"


def _planted_by_label(monkeypatch, exp, best_of):
    """tuning_cells with each label's held-out loss lowest at its own planted rate best_of[label]."""
    import math

    import rankwise.experiments.tuning as tuning

    monkeypatch.setattr(tuning, "_scores_on_disk", lambda cells, out: {
        c.id: {"eval_loss": math.log(c.candidate["lr"] / best_of[c.label]) ** 2, "split": "dev"} for c in cells})
    return tuning.tuning_cells(exp, None)


def test_own_tunes_a_sharing_label_only_where_no_label_before_it_runs(tmp_path, assets, monkeypatch):
    from rankwise.experiments.curves import sharing_rows

    exp = load_experiment(write_exp(tmp_path / "exp.yaml", assets, methods=OWN_METHODS, budgets="[2, 4]",
                                    extra=OWN_TUNE))
    cells, choices, table = _planted_by_label(monkeypatch, exp, {"uniform": 4.0e-3, "depth": 1.0e-3})
    # uniform runs at 4 only: depth takes its choice there and is tuned on its own at 2 (3 rates each)
    assert sorted((c.label, c.budget) for c in cells) == [("depth", 2)] * 3 + [("uniform", 4)] * 3
    assert choices == {("toy", "uniform", 4): {"lr": 4.0e-3}, ("toy", "depth", 2): {"lr": 1.0e-3}}
    lr = {(r.label, r.budget): r.candidate["lr"] for r in exp.runs(choices)}
    assert lr == {("uniform", 4): 4.0e-3, ("depth", 4): 4.0e-3, ("depth", 2): 1.0e-3}
    # nothing is shared at 2, so the sharing check has no row there even when depth is verified
    verified = OWN_TUNE + "  verify: {toy: [depth]}\n"
    exp = load_experiment(write_exp(tmp_path / "v.yaml", assets, methods=OWN_METHODS, budgets="[2, 4]",
                                    extra=verified))
    cells, choices, table = _planted_by_label(monkeypatch, exp, {"uniform": 4.0e-3, "depth": 1.0e-3})
    assert sorted((c.label, c.budget) for c in cells) == [("depth", 2)] * 3 + [("depth", 4)] * 3 + \
        [("uniform", 4)] * 3
    spec = {"share": {"depth": ["uniform", "own"]}, "verify": {"toy": ["depth"]}}
    rows = sharing_rows({"spec": spec, "table": table})
    assert [(r["budget"], r["own"], r["shared"], r["same"]) for r in rows] == \
        [("4", {"lr": 1.0e-3}, {"lr": 4.0e-3}, False)]


@pytest.mark.parametrize("share,message", [
    ("{depth: [own, uniform]}", "tune.share.depth: 'own' must come last"),
    ("{depth: [nope, own]}", "tune.share.depth: 'nope' is not tuned (tune.methods: uniform), nor 'own'"),
])
def test_bad_own_fails_with_one_line(tmp_path, assets, share, message):
    import re

    tune = OWN_TUNE.replace("{depth: [uniform, own]}", share)
    with pytest.raises(RankwiseError, match=re.escape(message)) as info:
        load_experiment(write_exp(tmp_path / "exp.yaml", assets, methods=OWN_METHODS, budgets="[2, 4]", extra=tune))
    assert "\n" not in str(info.value)


def test_own_needs_candidates_and_is_not_a_label(tmp_path, assets):
    tune = OWN_TUNE.replace("candidates: {lr: [1.0e-3, 2.0e-3, 4.0e-3]}", "candidates: {}").replace(
        "methods: {uniform: {}}", "methods: {uniform: {lr: [1.0e-3]}}")
    with pytest.raises(RankwiseError, match=r"tune.share.depth: 'own' tunes the label over tune.candidates"):
        load_experiment(write_exp(tmp_path / "a.yaml", assets, methods=OWN_METHODS, budgets="[2, 4]", extra=tune))
    with pytest.raises(RankwiseError, match=r"grid.methods.own: 'own' is a keyword of tune.share"):
        load_experiment(write_exp(tmp_path / "b.yaml", assets, budgets="[2, 4]", extra=OWN_TUNE,
                                  methods="[uniform, {strategy: depth, label: own}]"))


def test_the_tune_example_in_docs_sweep_md_loads_and_tunes_what_it_says(tmp_path, assets):
    """docs/sweep.md's tune: block, on a grid with its labels: uniform runs at the larger budget only, so spectral
    takes uniform_qv's choice below it and gradient (`[uniform, own]`) is tuned on its own there; depth is tuned
    on its own only to verify sharing, at uniform's budget; adalora tries 3 rates x 2 penalty weights."""
    import re
    from pathlib import Path

    md = (Path(__file__).resolve().parents[1] / "docs" / "sweep.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", md.split("## Tuning: `tune:`")[1], re.S).group(1)
    methods = ("[{strategy: uniform, budgets: ['1920']}, {strategy: uniform, label: uniform_qv, "
               "targets: [query, value]}, {method: adalora}, spectral, {strategy: depth, budgets: ['1920']}, gradient]")
    path = write_exp(tmp_path / "exp.yaml", assets, methods=methods, budgets="['256', '1920']", extra=block)
    path.write_text(path.read_text().replace("tasks:\n  toy:", "tasks:\n  sst2:"))
    exp = load_experiment(path)
    count = {}
    for c in exp.tuning_runs():
        count[(c.label, c.budget)] = count.get((c.label, c.budget), 0) + 1
    assert count == {("uniform", "1920"): 4, ("uniform_qv", "256"): 4, ("uniform_qv", "1920"): 4,
                     ("adalora", "256"): 6, ("adalora", "1920"): 6, ("gradient", "256"): 4, ("depth", "1920"): 4}
    assert [exp.tune.source(label, "256") for label in ("spectral", "gradient")] == ["uniform_qv", "gradient"]
    assert [exp.tune.source(label, "1920") for label in ("spectral", "depth", "gradient")] == ["uniform"] * 3
