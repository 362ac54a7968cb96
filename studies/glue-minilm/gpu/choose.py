"""Pick RTE and CoLA settings from the GPU settings check (uniform LoRA only) and write the GPU half of the study.

    python studies/glue-minilm/gpu/choose.py

Rule: per task and budget, the candidate of settings-gpu.yaml with the best mean metric over the seeds that every
candidate finished. Writes settings-gpu/choice.json and experiment-gpu.yaml (the study's RTE and CoLA tasks with
the chosen settings; its run ids equal those of experiment.yaml once that file holds the same settings), and
experiment-gpu2.yaml (the same plus the second-pass methods).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml

from rankwise.experiments.spec import Experiment, load_experiment

HERE = Path(__file__).resolve().parent.parent
METRIC = {"rte": "eval_accuracy", "cola": "eval_mcc"}
MAJORITY = {"rte": 146 / 277, "cola": 0.0}  # RTE validation: 146 of 277 are label 0; CoLA: MCC of a constant
SECOND_PASS = ["activation", "peft_eva", "multirank"]


def scores(check: Path) -> tuple[dict, Experiment]:
    """((task, candidate, budget) -> {seed: metric} for every finished run of the settings check, the check's
    experiment)."""
    exp = load_experiment(HERE / "settings-gpu.yaml", check_budgets=False)
    out: dict = {}
    for run in exp.runs():
        res = check / "runs" / run.id / "results.json"
        if not res.is_file():
            continue
        task, cand = run.task.split("-")
        value = json.loads(res.read_text())["eval"][METRIC[task]]
        out.setdefault((task, cand, run.budget), {})[run.seed] = value
    return out, exp


def choose(check: Path) -> dict:
    found, exp = scores(check)
    choice = {}
    for task in METRIC:
        for budget in exp.budgets:
            cands = {c: s for (t, c, b), s in found.items() if t == task and b == budget}
            if not cands:
                continue
            seeds = set.intersection(*(set(s) for s in cands.values()))
            if not seeds:
                seeds = max((set(s) for s in cands.values()), key=len)
                cands = {c: s for c, s in cands.items() if seeds <= set(s)}
            means = {c: statistics.mean(s[k] for k in seeds) for c, s in cands.items()}
            best = max(means, key=means.get)
            setting = exp.settings_for(f"{task}-{best}", budget)
            choice[f"{task}/r{budget}"] = {
                "candidate": best, "epochs": setting["epochs"], "lr": setting["lr"], "seeds": sorted(seeds),
                "means": means, "beats_majority_by": means[best] - MAJORITY[task]}
            print(f"{task} r{budget}: " + ", ".join(f"{c}={m:.4f}" for c, m in sorted(means.items()))
                  + f" -> {best} (epochs {setting['epochs']}, lr {setting['lr']}, seeds {sorted(seeds)})")
    return choice


def write_gpu_experiment(choice: dict) -> None:
    raw = yaml.safe_load((HERE / "experiment.yaml").read_text())
    tasks = {}
    for task in METRIC:
        if f"{task}/r4" not in choice:
            continue
        t = dict(raw["tasks"][task])
        low = choice[f"{task}/r4"]
        t.update(epochs=low["epochs"], lr=low["lr"])
        high = choice.get(f"{task}/r16")
        if high:
            over = {k: high[k] for k in ("epochs", "lr") if high[k] != low[k]}
            if over:
                t["by_budget"] = {16: over}
        tasks[task] = t
    raw["tasks"] = tasks
    raw["name"] = "glue-minilm-gpu"
    (HERE / "experiment-gpu.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    raw["grid"]["methods"] = list(raw["grid"]["methods"]) + SECOND_PASS
    (HERE / "experiment-gpu2.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


if __name__ == "__main__":
    check = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "settings-gpu"
    c = choose(check)
    (check / "choice.json").write_text(json.dumps(c, indent=2))
    write_gpu_experiment(c)
    print(json.dumps(c))
