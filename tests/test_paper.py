"""The paper (`paper/`): every macro it uses is defined in generated/numbers.tex, every value there equals one
recomputed here straight from the committed results.json files (numpy/scipy, not the generator's code), every
\\ref, \\cite and \\includegraphics target exists, the numbers quoted in README.md and docs/study.md agree with the
same recomputation, study v2's section says "in progress" until its grid is complete, and the PDF builds."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "paper"
# study v2 in macro names: the static allocators and the budgets
V2_STATIC = ["Spectral", "WeightNorm", "Depth", "ModuleType", "Gradient", "Eva", "Activation"]
V2_BUDGETS = ["BNineTwoOneSix", "BFourOneFourSevenTwo", "BOneSixFiveEightEightEight", "BSixSixThreeFiveFiveTwo"]
NUMBERS = PAPER / "generated" / "numbers.tex"
IN_CI = os.environ.get("CI", "").lower() == "true"
LOWER = ("eval_loss", "perplexity", "eval_mse")
_LINE = re.compile(r"^\\newcommand\{\\(rw[A-Za-z]+)\}\{(.*)\} % (.+)$")


def _numbers() -> dict:
    return _numbers_of(NUMBERS)


def _numbers_of(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def _sources() -> list[Path]:
    gen = [p for p in (PAPER / "generated").glob("*.tex") if p.name != "numbers.tex"]
    return [PAPER / "main.tex", *sorted((PAPER / "sections").glob("*.tex")), *sorted(gen)]


# ----- an independent reading of a sweep folder ------------------------------------------------------------------

class Sweep:
    def __init__(self, root: Path):
        self.root, self.name = root, root.name
        m = json.loads((root / "sweep.json").read_text())
        exp = m["experiment"]
        # a tuned sweep lists a grid cell once its settings are chosen; the others are counted as pending
        self.total = len(m["runs"]) + (m.get("tuning") or {}).get("pending_grid_runs", 0)
        seeds, budgets = exp.get("seeds") or [], exp.get("budgets") or []
        grid = len(seeds) * sum(len(budgets if x.get("budgets") is None else x["budgets"]) for x in exp["methods"])
        self.grid = {t: max(grid, sum(r["task"] == t for r in m["runs"])) for t in (exp.get("tasks") or {})}
        self.kinds = {x["label"]: x["kind"] for x in exp["methods"]}
        self.runs = []
        for row in m["runs"]:
            f = root / "runs" / row["id"] / "results.json"
            if f.is_file():
                r = json.loads(f.read_text())
                b = row["budget"]
                self.runs.append({"task": row["task"], "label": row["label"], "seed": row["seed"], "r": r,
                                  "dir": f.parent, "budget": f"r{b}" if isinstance(b, int) else f"b{b}"})
        self.metric = {}
        for task in {x["task"] for x in self.runs}:
            keys = set.intersection(*(set(x["r"]["eval"]) for x in self.runs if x["task"] == task))
            chosen = (exp.get("metrics") or {}).get(task)
            self.metric[task] = chosen or next(k for k in ("eval_pearson", "eval_accuracy", "eval_loss") if k in keys)

    @staticmethod
    def params(x) -> int:
        final = (x["r"].get("method_info") or {}).get("final_lora_params")
        return int(final) if final else int(x["r"]["train_info"]["lora_params"])

    def cell(self, task, budget, label) -> list:
        return sorted((x for x in self.runs if (x["task"], x["budget"], x["label"]) == (task, budget, label)),
                      key=lambda x: x["seed"])

    def value(self, x) -> float:
        return float(x["r"]["eval"][self.metric[x["task"]]])

    def reference(self, task, budget):
        """The label compared with: uniform, else uniform_qv where uniform did not run (budgets below rank 1)."""
        return next((lab for lab in ("uniform", "uniform_qv") if self.cell(task, budget, lab)), None)

    def diffs(self, task, budget, label):
        """Paired differences to the reference, or None when not compared (none, or a budget off by > 2%)."""
        ref_label = self.reference(task, budget)
        ref = {x["seed"]: x for x in self.cell(task, budget, ref_label)}
        pairs = [(x, ref[x["seed"]]) for x in self.cell(task, budget, label) if x["seed"] in ref]
        if label == ref_label or not pairs or any(abs(self.params(a) / self.params(b) - 1) > 0.02 for a, b in pairs):
            return None
        return np.array([self.value(a) - self.value(b) for a, b in pairs])

    def cells(self, task):
        return sorted({(x["budget"], x["label"]) for x in self.runs if x["task"] == task})

    def is_alloc(self, label) -> bool:
        return label not in ("uniform", "uniform_qv") and (self.kinds.get(label) == "strategy" or label == "multirank")


def _ttest(d):
    n = len(d)
    sd = d.std(ddof=1)
    if n < 2 or sd == 0:
        return d.mean(), math.nan, math.nan, math.nan, sd
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return d.mean(), d.mean() - half, d.mean() + half, float(stats.ttest_rel(d, np.zeros(n)).pvalue), sd


def _holm(ps: dict) -> dict:
    keys = sorted((k for k in ps if not math.isnan(ps[k])), key=lambda k: ps[k])
    out, running = {}, 0.0
    for i, k in enumerate(keys):
        running = max(running, min(1.0, (len(keys) - i) * ps[k]))
        out[k] = running
    return out


def _mde(sd, n):
    """Bisection on the noncentral-t power of the two-sided paired test (80% power, alpha 0.05)."""
    if n < 2 or not sd > 0:
        return math.nan
    return _noncentrality(n) * sd / math.sqrt(n)


@functools.lru_cache(maxsize=None)
def _noncentrality(n: int) -> float:
    crit = stats.t.ppf(0.975, n - 1)
    lo, hi = 0.0, 64.0
    for _ in range(200):
        mid = (lo + hi) / 2
        power = stats.nct.sf(crit, n - 1, mid) + stats.nct.cdf(-crit, n - 1, mid)
        lo, hi = (mid, hi) if power < 0.8 else (lo, mid)
    return (lo + hi) / 2


def _better(s: Sweep, task, lo, hi) -> int:
    sign = -1 if s.metric[task] in LOWER else 1
    a, b = sorted((sign * lo, sign * hi))
    return 0 if math.isnan(a) else (1 if a > 0 else (-1 if b < 0 else 0))


def _expected_cell(s: Sweep, task, budget, label, q, holm):
    xs = s.cell(task, budget, label)
    vals = np.array([s.value(x) for x in xs])
    if q in ("mean", "std", "seeds", "params"):
        return {"mean": vals.mean(), "std": vals.std(ddof=1) if len(vals) > 1 else math.nan, "seeds": len(vals),
                "params": round(np.mean([s.params(x) for x in xs]))}[q]
    infos = [x["r"].get("method_info") or {} for x in xs]
    ranks = [v for i in infos for v in (i.get("final_ranks") or {}).values()]
    attn = [v for i in infos for k, v in (i.get("final_ranks") or {}).items() if "attention" in k or "attn" in k]
    ffn = [v for i in infos for k, v in (i.get("final_ranks") or {}).items() if not ("attention" in k or "attn" in k)]
    dyn = {"initrank": lambda: xs[0]["r"]["run_info"]["adapter"]["init_rank"],
           "peakparams": lambda: round(np.mean([i["peak_params"] for i in infos])),
           "rankmin": lambda: min(ranks), "rankmax": lambda: max(ranks),
           "rankattn": lambda: np.mean(attn), "rankffn": lambda: np.mean(ffn),
           "zerolayers": lambda: sum(i.get("layers_pruned_to_zero", 0) for i in infos),
           "branches": lambda: "+".join(map(str, xs[0]["r"]["run_info"]["adapter"]["ranks"])),
           "effrank": lambda: np.mean([i["mean_effective_rank"] for i in infos]),
           "ranksum": lambda: np.mean([i["mean_rank_sum"] for i in infos]), "energy": lambda: infos[0]["energy"]}
    if q in dyn:
        return dyn[q]()
    d = s.diffs(task, budget, label)
    mean, lo, hi, p, sd = _ttest(d)
    ref = np.mean([s.value(x) for x in s.cell(task, budget, s.reference(task, budget))])
    if q == "shareofgain":
        return mean / _gain(s, task)[0]
    return {"delta": mean, "deltapts": 100 * mean, "lo": lo, "hi": hi, "p": p, "pholm": holm.get((budget, label)),
            "mde": _mde(sd, len(d)), "mdepts": 100 * _mde(sd, len(d)), "pct": 100 * mean / ref}[q]


def _gain(s: Sweep, task):
    budgets = sorted({b for b, lab in s.cells(task) if lab == "uniform"}, key=lambda b: float(b[1:]))
    lo, hi = s.cell(task, budgets[0], "uniform"), s.cell(task, budgets[-1], "uniform")
    by = {x["seed"]: s.value(x) for x in lo}
    gain = np.mean([s.value(x) - by[x["seed"]] for x in hi if x["seed"] in by])
    return gain, np.mean([s.value(x) for x in lo])


def _family(s: Sweep, task, alloc_only):
    out = []
    for budget, label in s.cells(task):
        d = s.diffs(task, budget, label)
        if d is not None and (s.is_alloc(label) or not alloc_only):
            out.append((budget, label, _ttest(d), len(d)))
    return out


def _expected_task(s: Sweep, task, budget, method, q, holm):
    if q in ("runs", "runstotal"):  # study v2 while it runs: finished runs and grid runs of the task
        return sum(x["task"] == task for x in s.runs) if q == "runs" else s.grid[task]
    first = next(x for x in s.runs if x["task"] == task)["r"]
    if q in ("evaln", "trainn", "steps"):
        return {"evaln": first["eval"]["num_samples"], "trainn": first["train_info"]["train_samples"],
                "steps": first["train_info"]["steps"]}[q]
    if q == "wallmedian":
        return np.median([x["r"]["train_info"]["wall_time_s"] for x in s.runs if x["task"] == task])
    if "-" in budget:
        gain, ref = _gain(s, task)
        return {"delta": gain, "deltapts": 100 * gain, "pct": 100 * gain / ref}[q]
    fam = _family(s, task, method == "alloc")
    if q.startswith("mde"):
        mdes = [100 * _mde(t[4], n) for _, _, t, n in fam]
        mdes = [m for m in mdes if not math.isnan(m)]
        return {"mdemedianpts": np.median(mdes), "mdeminpts": min(mdes), "mdemaxpts": max(mdes)}[q]
    return {"compared": len(fam), "better": sum(_better(s, task, t[1], t[2]) > 0 for _, _, t, _ in fam),
            "worse": sum(_better(s, task, t[1], t[2]) < 0 for _, _, t, _ in fam),
            "holm": sum(holm.get((b, lab), 1) < 0.05 for b, lab, _, _ in fam)}[q]


def _expected_study(s: Sweep, method, q, holms):
    runs = s.runs
    if method in ("all", "alloc"):
        return sum(_expected_task(s, t, "*", method, q, holms[t]) for t in {x["task"] for x in runs})
    if q in ("budgetdevmin", "budgetdevmax"):
        devs = []
        for x in (x for x in runs if x["label"] == method):
            ref_label = s.reference(x["task"], x["budget"])
            if ref_label == method:
                continue
            ref = [y for y in s.cell(x["task"], x["budget"], ref_label) if y["seed"] == x["seed"]]
            devs += [100 * (s.params(x) - s.params(ref[0])) / s.params(ref[0])] if ref else []
        return min(devs) if q == "budgetdevmin" else max(devs)

    def where(x):
        hw = x["r"]["run_info"].get("hardware") or {}
        return hw.get("gpu") or (f"CPU, {hw['cpus']} cores" if hw.get("cpus") else "CPU, machine not recorded")

    def versions(x):
        return ", ".join(f"{k} {v}" for k, v in sorted(x["r"]["run_info"]["versions"].items()))

    labels = {x["label"] for x in runs}
    if q == "alphafactor":
        plan = next(x["dir"] / "plan.json" for x in runs if (x["dir"] / "plan.json").is_file())
        return json.loads(plan.read_text())["alpha_factor"]
    return {"runs": len(runs), "runstotal": s.total, "cells": len({(x["task"], x["budget"], x["label"]) for x in runs}),
            "tasks": len({x["task"] for x in runs}), "methods": len(labels),
            "allocators": len({lab for lab in labels if s.kinds.get(lab) == "strategy"} - {"uniform"}),
            "budgets": len({x["budget"] for x in runs}),
            "seedsmax": max(Counter((x["task"], x["budget"], x["label"]) for x in runs).values()),
            "wallhours": sum(x["r"]["train_info"]["wall_time_s"] for x in runs) / 3600,
            "machines": "; ".join(f"{n} runs on {w}" for w, n in sorted(Counter(map(where, runs)).items())),
            "versions": "; ".join(f"{n} runs: {w}" for w, n in sorted(Counter(map(versions, runs)).items()))}[q]


def _holms(s: Sweep) -> dict:
    return {t: _holm({(b, lab): tt[3] for b, lab, tt, _ in _family(s, t, False)}) for t in {x["task"] for x in s.runs}}


def _expected(key: str, sweeps: dict, holms: dict):
    study, task, budget, method, q = key.split("|")
    if study == "*":
        return {"tolerancepct": 2, "holmlevel": 0.05, "powerpct": 80}[q]
    if study not in sweeps:  # study v2 when it has not started
        return 0
    s = sweeps[study]
    if task == "*" and q in ("runs", "runstotal"):
        return len(s.runs) if q == "runs" else s.total
    if task == "*":
        return _expected_study(s, method, q, holms[study])
    if budget == "*" or "-" in budget:
        return _expected_task(s, task, budget, method, q, holms[study].get(task, {}))
    return _expected_cell(s, task, budget, method, q, holms[study][task])


def _agrees(text: str, want) -> bool:
    """The macro's text against the recomputed value: equal within the rounding of the digits it shows."""
    text = text.replace(r"\_", "_")
    if isinstance(want, str):
        return text == want
    if text == "--":
        return want is None or (isinstance(want, float) and math.isnan(want))
    if text == "$<$0.001":
        return want < 0.001
    num = text.replace(",", "")
    decimals = len(num.split(".")[1]) if "." in num else 0
    return abs(float(num) - float(want)) <= 0.5 * 10 ** -decimals + 1e-9


@pytest.fixture(scope="module")
def recomputed():
    sweeps = {n: Sweep(ROOT / "studies" / n) for n in ("glue-minilm", "smollm2-alpaca")}
    if (ROOT / "studies" / "glue-minilm-v2" / "sweep.json").is_file():  # its runs, and its finished tasks' numbers
        sweeps["glue-minilm-v2"] = Sweep(ROOT / "studies" / "glue-minilm-v2")
    return sweeps, {n: _holms(s) for n, s in sweeps.items()}


def test_every_macro_used_is_defined():
    defined = _numbers()
    assert len(defined) > 500
    used = {m for p in _sources() for m in re.findall(r"\\(rw[A-Za-z]+)", p.read_text())}
    assert used, "the paper quotes no generated number"
    assert not used - set(defined), f"used but not in numbers.tex: {sorted(used - set(defined))[:10]}"


def _disagreements(numbers: dict, sweeps: dict, holms: dict) -> list[str]:
    wrong = []
    for name, (text, key) in numbers.items():
        want = _expected(key, sweeps, holms)
        if not _agrees(text, want):
            wrong.append(f"\\{name} = {text} but {key} recomputes to {want}")
    return wrong


def test_every_number_equals_its_recomputation(recomputed):
    wrong = _disagreements(_numbers(), *recomputed)
    assert not wrong, f"{len(wrong)} numbers disagree with results.json (run `make paper`): " + "; ".join(wrong[:5])


def test_refs_cites_and_graphics_exist():
    text = "\n".join(p.read_text() for p in _sources())
    labels = set(re.findall(r"\\label\{([^}]+)\}", text))
    refs = set(re.findall(r"\\ref\{([^}]+)\}", text))
    assert refs and not refs - labels, f"\\ref without \\label: {sorted(refs - labels)}"
    bib = set(re.findall(r"^@\w+\{([^,]+),", (PAPER / "references.bib").read_text(), re.M))
    cites = {k.strip() for group in re.findall(r"\\cite[tp]?\{([^}]+)\}", text) for k in group.split(",")}
    assert cites and not cites - bib, f"\\cite without a bib entry: {sorted(cites - bib)}"
    graphics = re.findall(r"\\includegraphics(?:\[[^]]*\])?\{([^}]+)\}", text)
    assert len(graphics) >= 5
    assert all((PAPER / g).is_file() for g in graphics), [g for g in graphics if not (PAPER / g).is_file()]


_DOC_TASKS = {"**SST-2, accuracy**": "sst2", "**STS-B, Pearson correlation**": "stsb",
              "**CoLA, Matthews correlation**": "cola", "**RTE, accuracy**": "rte"}


def _doc_rows(md: str, header: str) -> list[list[str]]:
    block = md.split(header, 1)[1].split("\n\n", 2)[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:] if line.startswith("|")]


def _num_pairs(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", cell.replace("<0.001", ""))]


def test_study_doc_tables_agree_with_results(recomputed):
    """docs/study.md's per-task tables: every mean, std, paired difference, interval and p, against results.json."""
    sweeps, _ = recomputed
    s, md, checked = sweeps["glue-minilm"], (ROOT / "docs" / "study.md").read_text(), 0
    for header, task in _DOC_TASKS.items():
        for row in _doc_rows(md, header):
            label = row[0]
            for budget, (stat, delta) in (("r4", row[1:3]), ("r16", row[3:5])):
                vals = np.array([s.value(x) for x in s.cell(task, budget, label)])
                assert _num_pairs(stat) == pytest.approx([vals.mean(), vals.std(ddof=1)], abs=5e-5), (task, label)
                d = s.diffs(task, budget, label)
                if d is None:
                    assert not re.search(r"\[", delta), (task, budget, label, delta)
                    continue
                mean, lo, hi, p, _ = _ttest(d)
                got = _num_pairs(delta)
                assert got[:3] == pytest.approx([mean, lo, hi], abs=5e-5), (task, budget, label)
                assert (p < 0.001) if "<0.001" in delta else got[3] == pytest.approx(p, abs=5e-4)
                checked += 1
    assert checked == 64 + 8  # 9 compared methods x 2 budgets x 4 tasks


def test_readme_and_decoder_table_agree_with_results(recomputed):
    sweeps, holms = recomputed
    s = sweeps["smollm2-alpaca"]
    md = (ROOT / "docs" / "study.md").read_text()
    for row in _doc_rows(md, "**SmolLM2-135M on alpaca_libre, eval loss on the response tokens**"):
        label, budget = row[0], row[1]
        vals = np.array([s.value(x) for x in s.cell("alpaca", budget, label)])
        assert _num_pairs(row[4])[:2] == pytest.approx([vals.mean(), vals.std(ddof=1)], abs=5e-5), (label, budget)
        if "[" in row[6]:
            mean, lo, hi, p, _ = _ttest(s.diffs("alpaca", budget, label))
            assert _num_pairs(row[6]) == pytest.approx([mean, lo, hi, p], abs=5e-4), label
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"module_type and spectral lowered the eval loss by (\d+\.\d+)% and\s+(\d+\.\d+)%", readme)
    assert m, "README no longer quotes the decoder result"
    ref = np.mean([s.value(x) for x in s.cell("alpaca", "r8", "uniform")])
    for quoted, label in zip(m.groups(), ("module_type", "spectral")):
        assert float(quoted) == pytest.approx(-100 * s.diffs("alpaca", "r8", label).mean() / ref, abs=0.005)
    share = s.diffs("alpaca", "r8", "module_type").mean() / _gain(s, "alpaca")[0]
    assert "a sixth of what doubling the rank gains" in readme and abs(share - 1 / 6) < 0.02


def test_generated_files_are_current(tmp_path):
    """Regenerating from the committed results gives the committed numbers and tables (figures aside)."""
    from rankwise.experiments.paper import make_paper

    make_paper([ROOT / "studies" / "glue-minilm", ROOT / "studies" / "smollm2-alpaca"], tmp_path,
               v2=ROOT / "studies" / "glue-minilm-v2", figures=False)
    for f in sorted(tmp_path.glob("*.tex")):
        assert f.read_text() == (PAPER / "generated" / f.name).read_text(), f"{f.name} is stale: run `make paper`"


def test_a_changed_result_changes_its_number_and_the_check_fails_until_regenerated(tmp_path):
    """Issue 25: edit one committed results.json value (a copy of the decoder study): the regenerated macro moves
    with it, and the independent recomputation flags the old numbers.tex until it is regenerated."""
    from rankwise.experiments.paper import make_paper

    study = tmp_path / "smollm2-alpaca"
    shutil.copytree(ROOT / "studies" / "smollm2-alpaca", study, ignore=shutil.ignore_patterns("report", "logs"))
    make_paper([study], tmp_path / "before", v2=tmp_path / "no-v2", figures=False)
    before = _numbers_of(tmp_path / "before" / "numbers.tex")
    row = json.loads((study / "sweep.json").read_text())["runs"][0]
    sweep = Sweep(study)
    x = next(x for x in sweep.runs if x["dir"].name == row["id"])
    key = "|".join([study.name, x["task"], x["budget"], x["label"], "mean"])
    [name] = [n for n, (_, k) in before.items() if k == key]
    f = x["dir"] / "results.json"
    r = json.loads(f.read_text())
    r["eval"][sweep.metric[x["task"]]] += 0.25  # one run of the cell moves by 0.25: the cell mean by 0.25 / n
    f.write_text(json.dumps(r))
    edited = {study.name: Sweep(study)}
    holms = {study.name: _holms(edited[study.name])}
    stale = _disagreements(before, edited, holms)
    assert any(w.startswith(f"\\{name} = ") for w in stale), stale[:3]
    make_paper([study], tmp_path / "after", v2=tmp_path / "no-v2", figures=False)
    after = _numbers_of(tmp_path / "after" / "numbers.tex")
    n = len(sweep.cell(x["task"], x["budget"], x["label"]))
    assert float(after[name][0]) - float(before[name][0]) == pytest.approx(0.25 / n, abs=2e-4)
    assert _disagreements(after, edited, holms) == []


def _fake_run(root: Path, rid: str, seed: int, value: float) -> dict:
    d = root / "runs" / rid
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({
        "schema": 1, "run_info": {"seed": seed, "versions": {"torch": "x"}},
        "train_info": {"lora_params": 1000, "trainable_params": 1000, "wall_time_s": 1.0, "peak_memory_bytes": 1,
                       "train_samples": 10, "steps": 2},
        "eval": {"eval_accuracy": value, "num_samples": 10}}))


def test_v2_prose_on_the_finished_tasks_says_what_its_numbers_say():
    """results.tex's paragraph on v2's finished tasks quotes macros; the words around them (how many, which one,
    a loss) are checked here against those numbers, which the recomputation above checks against the runs."""
    text = " ".join((PAPER / "sections" / "results.tex").read_text().split("What v2 shows")[1].split())
    num = {name: value for name, (value, _) in _numbers().items()}

    def pts(task, label, budget="BNineTwoOneSix"):
        return float(num[f"rwGlueVtwo{task}{budget}{label}Deltapts"])

    below = [lab for lab in V2_STATIC if pts("Stsb", lab) < 0]
    assert len(below) == 5 and "five of the seven allocators' means on STS-B are below" in text
    assert set(below) == {"Depth", "ModuleType", "Gradient", "Spectral", "Activation"}
    assert max(V2_STATIC, key=lambda lab: pts("SstTwo", lab)) == "Gradient"
    assert "none is above it by more than \\rwGlueVtwoSstTwoBNineTwoOneSixGradientDeltapts{} points" in text
    assert num["rwGlueVtwoStsbAllocHolm"] == "1" and pts("Stsb", "ModuleType") < 0
    assert float(num["rwGlueVtwoStsbBNineTwoOneSixModuleTypePholm"]) < 0.05 and "and it is a loss" in text
    assert num["rwGlueVtwoSstTwoAllocHolm"] == "0"
    # "no longer loses by v1's margins": v1 at r16 lost more than 10 points on both; v2 within 3 of uniform
    assert all(float(num[f"rwGlue{t}RSixteenAdaloraDeltapts"]) < -10 for t in ("SstTwo", "Stsb"))
    assert all(abs(pts(t, "Adalora", "BSixSixThreeFiveFiveTwo")) < 3 for t in ("SstTwo", "Stsb"))
    # CoLA: uniform's best mean is rank 4's; no allocator comparison survives; all seven below q,v below rank 1
    uni = {b: float(num[f"rwGlueVtwoCola{b}UniformMean"]) for b in V2_BUDGETS[1:]}
    assert max(uni, key=uni.get) == "BOneSixFiveEightEightEight" and "uniform's best mean MCC is" in text
    assert num["rwGlueVtwoColaAllocHolm"] == "0" and all(pts("Cola", lab) < 0 for lab in V2_STATIC)
    assert "below rank 1 all seven allocators' means are below the query/value default" in text
    # over the three tasks: one survivor, STS-B's loss; no allocator's interval above q,v's below rank 1
    assert num["rwGlueVtwoAllocHolm"] == "1" and num["rwGlueVtwoAllocCompared"] == "90"
    assert "survives Holm's adjustment (the loss above)" in text
    assert not any(float(num[f"rwGlueVtwo{t}BNineTwoOneSix{lab}Lo"]) > 0 for t in ("SstTwo", "Stsb", "Cola")
                   for lab in V2_STATIC) and "no allocator's interval lies above the query/value default's" in text


def test_v2_abstract_discussion_and_conclusion_say_what_its_numbers_say():
    """The abstract's, the discussion's and the conclusion's words on v2 (one survivor and it is a loss, one
    interval above zero and whose, AdaLoRA's range, what the power rules out) against the generated numbers."""
    num = {name: value for name, (value, _) in _numbers().items()}
    abstract, discussion, conclusion = (" ".join((PAPER / "sections" / f"{s}.tex").read_text().split())
                                        for s in ("abstract", "discussion", "conclusion"))
    tasks = ("SstTwo", "Stsb", "Cola")
    # the one allocator comparison with an interval above zero: multirank, SST-2, rank 16, not after Holm
    above = [(t, b, lab) for t in tasks for b in V2_BUDGETS for lab in [*V2_STATIC, "Multirank"]
             if num.get(f"rwGlueVtwo{t}{b}{lab}Lo", "--") != "--" and float(num[f"rwGlueVtwo{t}{b}{lab}Lo"]) > 0]
    assert above == [("SstTwo", "BSixSixThreeFiveFiveTwo", "Multirank")] and num["rwGlueVtwoAllocBetter"] == "1"
    assert float(num["rwGlueVtwoSstTwoBSixSixThreeFiveFiveTwoMultirankPholm"]) > 0.05
    assert "(multi-rank LoRA on SST-2 at rank 16, not significant after adjustment)" in abstract
    # the one survivor is a loss (STS-B's module_type below rank 1), said in the abstract and the discussion
    assert [t for t in tasks if num[f"rwGlueVtwo{t}AllocHolm"] != "0"] == ["Stsb"]
    assert float(num["rwGlueVtwoStsbBNineTwoOneSixModuleTypeDeltapts"]) < 0
    assert "\\rwGlueVtwoAllocHolm{} survives Holm's adjustment, a loss" in abstract
    assert "survives Holm's adjustment, and it is a loss" in discussion
    assert "the one comparison that survives the adjustment is a loss" in conclusion
    assert "below rank 1 no allocator's interval lies above the query/value default's" in abstract
    # AdaLoRA at rank 16: the abstract's range is the smallest and largest of the three tasks
    ada = {t: float(num[f"rwGlueVtwo{t}BSixSixThreeFiveFiveTwoAdaloraDeltapts"]) for t in tasks}
    lo, hi = min(ada, key=ada.get), max(ada, key=ada.get)
    assert (f"between \\rwGlueVtwo{lo}BSixSixThreeFiveFiveTwoAdaloraDeltapts{{}} and "
            f"\\rwGlueVtwo{hi}BSixSixThreeFiveFiveTwoAdaloraDeltapts{{}} points") in abstract
    # the power: SST-2's median MDE fell below v1's; STS-B's and CoLA's stay large ("only large effects")
    assert float(num["rwGlueVtwoSstTwoAllocMdemedianpts"]) < float(num["rwGlueSstTwoAllocMdemedianpts"])
    assert min(float(num[f"rwGlueVtwo{t}AllocMdemedianpts"]) for t in ("Stsb", "Cola")) > 3
    assert "there, too, v2 rules out only large effects" in discussion


def test_v2_section_in_progress_then_tables(tmp_path):
    from rankwise.experiments.paper import make_paper

    v2 = tmp_path / "glue-minilm-v2"
    rows = [{"id": f"t-{lab}-s{s}", "task": "t", "label": lab, "kind": "strategy", "budget": 1, "seed": s}
            for lab in ("uniform", "depth") for s in (0, 1, 2)]
    methods = [{"label": lab, "kind": "strategy"} for lab in ("uniform", "depth")]
    v2.mkdir()
    (v2 / "sweep.json").write_text(json.dumps({"runs": rows, "experiment": {"methods": methods}}))
    for i, row in enumerate(rows[:-1]):
        _fake_run(v2, row["id"], row["seed"], 0.5 + 0.01 * i)
    studies = [ROOT / "studies" / "smollm2-alpaca"]
    make_paper(studies, tmp_path / "a", v2=v2, figures=False)
    text, nums = (tmp_path / "a" / "v2.tex").read_text(), (tmp_path / "a" / "numbers.tex").read_text()
    assert r"is in progress: \rwGlueVtwoRuns{} of \rwGlueVtwoRunstotal{} runs" in text
    assert r"\newcommand{\rwGlueVtwoRuns}{5}" in nums and r"\newcommand{\rwGlueVtwoRunstotal}{6}" in nums
    _fake_run(v2, rows[-1]["id"], 2, 0.58)
    make_paper(studies, tmp_path / "b", v2=v2, figures=False)
    text, nums = (tmp_path / "b" / "v2.tex").read_text(), (tmp_path / "b" / "numbers.tex").read_text()
    assert "is complete" in text and r"\label{tab:glue-minilm-v2-t}" in text
    # depth - uniform per seed: (0.53-0.50, 0.54-0.51, 0.58-0.52) -> mean 0.04, by hand
    assert r"\newcommand{\rwGlueVtwoTROneDepthDelta}{+0.0400}" in nums


def test_v2_finished_task_gets_its_table_while_others_run(tmp_path):
    """Task a's grid is finished: its table and numbers appear; task b's is one run short: counted, no table. At
    budget 1 uniform did not run, so a is compared with uniform_qv there (the report's rule)."""
    from rankwise.experiments.paper import make_paper

    v2 = tmp_path / "glue-minilm-v2"
    methods = [{"label": "uniform", "kind": "strategy", "budgets": ["2"]},
               {"label": "uniform_qv", "kind": "strategy", "budgets": None},
               {"label": "depth", "kind": "strategy", "budgets": None}]
    exp = {"methods": methods, "budgets": ["1", "2"], "seeds": [0, 1, 2], "tasks": {"a": {}, "b": {}}}
    base = {("uniform", "2"): 0.70, ("uniform_qv", "1"): 0.55, ("uniform_qv", "2"): 0.66, ("depth", "1"): 0.60,
            ("depth", "2"): 0.71}
    bump = {("depth", "1"): (0.0, 0.01, 0.03)}  # depth - uniform_qv at budget 1: 0.05, 0.06, 0.08 by seed
    rows = [{"id": f"{task}-{lab}-b{b}-s{s}", "task": task, "label": lab, "kind": "strategy", "budget": b, "seed": s}
            for task in ("a", "b") for s in (0, 1, 2) for b in ("1", "2") for lab in ("uniform", "uniform_qv", "depth")
            if (lab, b) in base]
    v2.mkdir()
    (v2 / "sweep.json").write_text(json.dumps({"runs": rows, "experiment": exp}))
    for row in rows[:-1]:
        key, s = (row["label"], row["budget"]), row["seed"]
        _fake_run(v2, row["id"], s, base[key] + 0.01 * s + bump.get(key, (0, 0, 0))[s])
    make_paper([ROOT / "studies" / "smollm2-alpaca"], tmp_path / "out", v2=v2, figures=False)
    text, nums = (tmp_path / "out" / "v2.tex").read_text(), (tmp_path / "out" / "numbers.tex").read_text()
    assert r"is in progress: \rwGlueVtwoRuns{} of \rwGlueVtwoRunstotal{} runs" in text
    assert r"Complete: \texttt{a} (\rwGlueVtwoARuns{} runs, Table~\ref{tab:glue-minilm-v2-a})" in text
    assert r"In progress: \texttt{b} (\rwGlueVtwoBRuns{} of \rwGlueVtwoBRunstotal{} runs)" in text
    assert r"\label{tab:glue-minilm-v2-a}" in text and r"\label{tab:glue-minilm-v2-b}" not in text
    assert r"\newcommand{\rwGlueVtwoBRuns}{14}" in nums and r"\newcommand{\rwGlueVtwoBRunstotal}{15}" in nums
    assert "rwGlueVtwoBBOne" not in nums and "rwGlueVtwoCells" not in nums  # no numbers of b, nor study totals
    # where the runs so far ran and with what (the fake runs record torch "x" and no hardware): 29 finished runs
    assert r"Machines: \rwGlueVtwoMachines{}. Library versions, as each run recorded them: \rwGlueVtwoVersions{}." in text
    assert r"\newcommand{\rwGlueVtwoMachines}{29 runs on CPU, machine not recorded}" in nums
    assert r"\newcommand{\rwGlueVtwoVersions}{29 runs: torch x}" in nums
    # depth vs uniform_qv at budget 1, by hand: mean of (0.05, 0.06, 0.08) = 0.0633; over uniform_qv's mean 0.56
    assert r"\newcommand{\rwGlueVtwoABOneDepthDelta}{+0.0633}" in nums
    assert r"\newcommand{\rwGlueVtwoABOneDepthPct}{+11.31}" in nums
    assert r"\texttt{uniform\_qv} & \rwGlueVtwoABOneUniformQvParams{} & \rwGlueVtwoABOneUniformQvMean{} $\pm$ " \
           r"\rwGlueVtwoABOneUniformQvStd{} & (reference)" in text
    assert r"$\Delta$ vs reference" in text and r"\texttt{uniform\_qv}: the row marked" in text
    # and the independent recomputation agrees with every number v2 got
    s = Sweep(v2)
    sweeps, holms = {"glue-minilm-v2": s}, {"glue-minilm-v2": _holms(s)}
    rows = [(n, text, key) for n, (text, key) in _numbers_of(tmp_path / "out" / "numbers.tex").items()
            if key.startswith("glue-minilm-v2|")]
    assert len(rows) > 40
    assert all(_agrees(text, _expected(key, sweeps, holms)) for _, text, key in rows), rows


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is missing in CI; .ci/run installs it (make paper-tex)")
        pytest.skip(f"{name} is not installed here (make paper-tex installs it; CI=true makes this a failure)")
    return path


def test_pdf_builds_without_undefined_references(tmp_path):
    latexmk = _tool("latexmk")
    work = tmp_path / "paper"
    shutil.copytree(PAPER, work, ignore=shutil.ignore_patterns("main.pdf", "*.aux", "*.log", "*.bbl", "*.fls",
                                                                "*.fdb_latexmk", "*.blg", "*.out"))
    proc = subprocess.run([latexmk, "-pdf", "main.tex"], cwd=work, capture_output=True, text=True, timeout=300)
    log = (work / "main.log").read_text(errors="replace")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert not re.search(r"(Reference|Citation) .* undefined|There were undefined references", log)
    pages = int(re.search(r"Output written on main\.pdf \((\d+) pages", log).group(1))
    assert pages >= 8


def test_spelling():
    codespell = _tool("codespell")
    files = [PAPER / "main.tex", PAPER / "references.bib", *sorted((PAPER / "sections").glob("*.tex"))]
    proc = subprocess.run([codespell, "--ignore-words", str(PAPER / "codespell-words.txt"), *map(str, files)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
