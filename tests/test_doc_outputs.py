"""What the doc examples print or write, checked against independent references (tests/test_docs.py only checks
that they run). The same commands as the docs, in-process through `rankwise.cli.main` (or the documented Python
API), on the embedded MiniLM; the references are hand counts from its safetensors file read with numpy, and the
same adapter loaded with plain transformers + peft, never rankwise's own output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

# MiniLM-L6: 6 blocks of these linear layers; attention 384x384, intermediate 1536x384, output 384x1536
MODULES = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense"]
DOCUMENTED_STRATEGIES = {"uniform", "depth", "module_type", "weight_norm", "spectral", "activation", "gradient", "eva",
                         "discovered"}  # docs/strategies.md, the table


def _main(argv, capsys) -> str:
    from rankwise.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _weights(minilm) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k.removeprefix("bert.").removesuffix(".weight"): v.astype(np.float64)
            for k, v in load_file(str(minilm / "model.safetensors")).items() if k.endswith(".weight") and v.ndim == 2}


def test_strategies_json_lists_the_documented_strategies(capsys):
    """docs/strategies.md block 0: `rankwise strategies --format json`."""
    rows = json.loads(_main(["strategies", "--format", "json"], capsys))
    assert {r["name"] for r in rows} == DOCUMENTED_STRATEGIES
    spectral = next(r for r in rows if r["name"] == "spectral")
    assert {"w_hill": 0.7, "w_spikes": 0.3}.items() <= spectral["hparams"].items()  # the documented weights


def test_analyze_json_rows_and_metrics_by_hand(minilm, tmp_path, capsys):
    """docs/analyze.md block 0: `analyze minilm --format json --out minilm.json`: one row per linear layer (36),
    and the metrics of a row equal numpy's eigenvalues of W^T W put through the documented formulas."""
    out = tmp_path / "minilm.json"
    _main(["analyze", "minilm", "-q", "--format", "json", "--out", out], capsys)
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {f"encoder.layer.{i}.{m}" for i in range(6) for m in MODULES}
    weights = _weights(minilm)
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.5.output.dense"):
        w = weights[name]
        gram = w.T @ w if w.shape[1] <= w.shape[0] else w @ w.T
        lam = np.sort(np.clip(np.linalg.eigvalsh(gram), 0, None))
        n, i = len(lam), len(lam) // 2
        m = n - i
        hill = 1 + m / (np.log(lam[i:]).sum() - m * math.log(lam[i]))
        row = rows[name]
        assert row["shape"] == list(w.shape)
        assert row["alpha_hill"] == pytest.approx(hill, rel=1e-8)
        assert row["spectral_norm"] == pytest.approx(lam[-1], rel=1e-8)
        assert row["frobenius_norm"] == pytest.approx(np.linalg.norm(w), rel=1e-8)
        assert row["stable_rank"] == pytest.approx(lam.sum() / lam[-1], rel=1e-8)


def test_plan_examples_spend_what_the_docs_say(minilm, tmp_path, capsys):
    """docs/plan.md block 0 (and README's quick start): spectral at 300k spends sum r * (in + out) <= 300000, within
    one rank step of the cheapest layer (768); uniform --budget-rank 8 on query/value is 12 x 8 x 768."""
    _main(["plan", "minilm", "--strategy", "spectral", "--budget", "300k", "--out", tmp_path / "spectral", "-q"],
          capsys)
    plan = json.loads((tmp_path / "spectral" / "plan.json").read_text())
    weights = _weights(minilm)
    spent = sum(r["rank"] * sum(weights[r["name"]].shape) for r in plan["layers"])
    assert plan["budget"]["params"] == 300000 and plan["spent"] == spent and 300000 - 768 < spent <= 300000
    assert len({r["rank"] for r in plan["layers"]}) > 1  # non-uniform
    _main(["plan", "minilm", "--strategy", "uniform", "--budget-rank", "8", "--targets", "query", "value", "--out",
           tmp_path / "uniform", "-q"], capsys)
    uni = json.loads((tmp_path / "uniform" / "plan.json").read_text())
    adapted = {r["name"]: r["rank"] for r in uni["layers"] if r["rank"]}
    assert adapted == {f"encoder.layer.{i}.attention.self.{m}": 8 for i in range(6) for m in ("query", "value")}
    assert uni["spent"] == 12 * 8 * (384 + 384) == 73728
    config = json.loads((tmp_path / "uniform" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"  # an ordinary peft config, as the README says


# ----- shared helpers for the commands below: in-process, output captured, failures shown --------------------

ATTN = 384 + 384  # one rank of a 384 x 384 projection
FFN = 384 + 1536  # one rank of a feed-forward layer
RANK1_ALL_LINEAR = 6 * (4 * ATTN + 2 * FFN)  # 41,472: rank 1 on MiniLM's 36 linear layers
HEAD = (384 * 384 + 384) + (384 * 2 + 2)  # BERT's pooler (trained, see docs/train.md) + a 2-class classifier


def _cli(*argv) -> tuple[str, str]:
    """`rankwise ARGV` in this process; (stdout, stderr); exit code 0 required."""
    import contextlib
    import io

    from rankwise.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    assert code == 0, f"rankwise {' '.join(map(str, argv))} exited {code}:\n{err.getvalue()[-3000:]}"
    return out.getvalue(), err.getvalue()


def _tiny_csv(path, rows: str) -> None:
    """The docs' tiny CSV: the header, then the rows ten times."""
    path.write_text(rows.split("\n", 1)[0] + "\n" + rows.split("\n", 1)[1] * 10)


def _lora_numel(named) -> int:
    return sum(int(np.prod(t.shape)) for n, t in named if "lora_" in n)


def _plain_peft(run_dir, num_labels: int):
    """The run's adapter on its base, loaded with plain transformers + peft (no rankwise), as docs/train.md does."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = json.loads((run_dir / "task.json").read_text())["base_model_path"]
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels), str(run_dir)).eval()
    return model, AutoTokenizer.from_pretrained(base)


def _logits(model, tok, texts) -> np.ndarray:
    import torch

    with torch.no_grad():  # one text at a time: no padding to differ from rankwise's batching
        return np.concatenate([model(**tok([t], return_tensors="pt")).logits.double().numpy() for t in texts])


# ----- README.md block 2 and docs/plan.md block 2: the Python API --------------------------------------------


def test_readme_api_plan_applied_model_holds_the_planned_lora(minilm):
    """README block 2: make_plan(spectral, 300k) + apply: the applied model's LoRA tensors number sum r (in + out)
    over the planned ranks (shapes from the safetensors file), and that is <= 300,000, within one rank step."""
    import rankwise
    from transformers import AutoModel

    stats = rankwise.analyze("minilm", progress=False)
    plan = rankwise.make_plan("minilm", "spectral", "300k", stats=stats)
    weights = _weights(minilm)
    by_hand = sum(r * sum(weights[name].shape) for name, r in plan.ranks.items())
    model = rankwise.apply(AutoModel.from_pretrained(str(minilm)), plan)
    assert _lora_numel(model.named_parameters()) == by_hand == plan.spent
    assert 300000 - ATTN < plan.spent <= 300000 and plan.budget.params == 300000
    assert len(set(plan.ranks.values())) > 1 and len(plan.adapted) == sum(1 for r in plan.ranks.values() if r)


def test_plan_api_depth_decay_through_plain_peft(minilm):
    """docs/plan.md block 2: depth 200k, direction=decay: plain peft builds from `to_lora_config` exactly the
    hand-counted LoRA parameters, within one rank step under 200k, and early blocks get more rank than late ones."""
    import rankwise
    from peft import get_peft_model
    from transformers import AutoModel

    plan = rankwise.make_plan("minilm", "depth", "200k", direction="decay", progress=False)
    config = plan.to_lora_config(lora_dropout=0.05)
    weights = _weights(minilm)
    by_hand = sum(r * sum(weights[name].shape) for name, r in plan.ranks.items())
    model = get_peft_model(AutoModel.from_pretrained(str(minilm)), config)
    assert _lora_numel(model.named_parameters()) == by_hand == plan.spent
    assert 200000 - ATTN < plan.spent <= 200000 and config.lora_dropout == 0.05

    def block(i):
        return sum(r for n, r in plan.ranks.items() if n.startswith(f"encoder.layer.{i}."))

    assert block(0) > block(5) and all(block(i) >= block(i + 1) for i in range(5))


# ----- docs/train.md blocks 2-5 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_page(tmp_path_factory):
    """docs/train.md's tiny CSV and its three runs: --preset efficient, spectral --budget-rank 4, train(rank=2)."""
    from conftest import minilm_or_skip

    minilm_or_skip()
    d = tmp_path_factory.mktemp("train_page")
    _tiny_csv(d / "tiny.csv", "text,label\na good film,1\nan awful film,0\n")
    common = ["--max-steps", "2", "--max-length", "32", "-q"]
    _cli("train", "minilm", "--data", d / "tiny.csv", "--preset", "efficient", "--out", d / "tiny", *common)
    _cli("train", "minilm", "--data", d / "tiny.csv", "--strategy", "spectral", "--budget-rank", "4",
         "--out", d / "spectral", *common)
    from rankwise.training import train

    api = train("minilm", str(d / "tiny.csv"), rank=2, targets=["query", "value"], max_steps=1, max_length=32,
                out=str(d / "api"), progress=False)
    return d, api


def test_train_preset_efficient_loads_in_plain_peft_with_its_lora(train_page):
    """docs/train.md blocks 2-3: the efficient preset is uniform r=4 on query/value: plain peft loads 12 x 4 x 768
    LoRA parameters, and results.json's counts are those plus the trained head."""
    d, _ = train_page
    model, _ = _plain_peft(d / "tiny", 2)
    assert _lora_numel(model.named_parameters()) == 12 * 4 * ATTN == 36864
    r = json.loads((d / "tiny" / "results.json").read_text())
    assert r["train_info"]["lora_params"] == 36864 and r["train_info"]["trainable_params"] == 36864 + HEAD
    assert r["train_info"]["steps"] == 2 and 0 <= r["eval"]["eval_accuracy"] <= 1


def test_train_spectral_budget_rank_4_spends_what_uniform_r4_costs(train_page):
    """docs/train.md block 4: --budget-rank 4 on all linear layers is 4 x 41,472 = 165,888; the saved adapter's
    LoRA tensors (read with safetensors) hold the plan's ranks, within one rank step of it."""
    from safetensors.numpy import load_file

    d, _ = train_page
    plan = json.loads((d / "spectral" / "plan.json").read_text())
    saved = _lora_numel(load_file(str(d / "spectral" / "adapter_model.safetensors")).items())
    by_hand = sum(r["rank"] * (r["shape"][0] + r["shape"][1]) for r in plan["layers"])
    assert plan["strategy"] == "spectral" and plan["budget"]["params"] == 4 * RANK1_ALL_LINEAR == 165888
    assert saved == by_hand == plan["spent"] and 165888 - ATTN < saved <= 165888
    assert len({r["rank"] for r in plan["layers"]}) > 1


def test_train_python_api_counts_by_hand(train_page):
    """docs/train.md block 5: rank 2 on query/value: 12 x 2 x 768 LoRA parameters, trainable = that + the head."""
    d, api = train_page
    assert api["train_info"]["lora_params"] == 12 * 2 * ATTN == 18432
    assert api["train_info"]["trainable_params"] == 18432 + HEAD
    assert api["train_info"]["steps"] == 1 and json.loads((d / "api" / "results.json").read_text()) == api


# ----- docs/sweep.md blocks 0-2 ----------------------------------------------------------------------------------

SWEEP_YAML = """base: {model: minilm, targets: [query, value], max_steps: 2, max_length: 32, batch_size: 8}
tasks:
  tiny: {data: tiny.csv}
grid:
  methods: [uniform, depth]
  budgets: [2]
  seeds: [0]
"""


@pytest.fixture(scope="module")
def sweep_page(tmp_path_factory):
    """docs/sweep.md's example: the dry run, the sweep, the same sweep again; (folder, dry-run stdout, the
    dry run left a folder?, the re-run's stderr)."""
    from conftest import minilm_or_skip

    minilm_or_skip()
    d = tmp_path_factory.mktemp("sweep_page")
    _tiny_csv(d / "tiny.csv", "text,label\na good film,1\nan awful film,0\n")
    (d / "exp.yaml").write_text(SWEEP_YAML)
    out = d / "sweeps" / "tiny"
    dry, _ = _cli("sweep", d / "exp.yaml", "--out", out, "--dry-run")
    dry_left = out.exists()
    _cli("sweep", d / "exp.yaml", "--out", out, "-q")
    _, again = _cli("sweep", d / "exp.yaml", "--out", out, "-q")
    return out, dry, dry_left, again


def test_sweep_dry_run_lists_the_cells_and_creates_nothing(sweep_page):
    """docs/sweep.md block 0: two cells, both to run, each priced at uniform r=2 on 12 query/value layers
    (2 x 12 x 768 = 18,432, all 384 x 384, so every allocator spends it exactly); no folder is made."""
    out, dry, dry_left, _ = sweep_page
    rows = [line.split() for line in dry.splitlines() if line.startswith("tiny-")]
    assert [r[0].rsplit("-", 1)[0] for r in rows] == ["tiny-uniform-r2-s0", "tiny-depth-r2-s0"]
    assert all(r[1:5] == ["todo", "18,432", "18,432", "+0.00%"] for r in rows), rows
    assert "2 runs: 0 finished, 2 to run" in dry and not dry_left


def test_sweep_runs_spend_the_budget_and_resume_does_nothing(sweep_page):
    """docs/sweep.md blocks 1-2: the ids the dry run listed are the run folders; each saved adapter holds 18,432
    LoRA parameters (safetensors, by hand), uniform at r=2 everywhere, depth (grow) more rank in later blocks;
    the second sweep runs nothing and starts no run again."""
    from safetensors.numpy import load_file

    out, dry, _, again = sweep_page
    ids = [line.split()[0] for line in dry.splitlines() if line.startswith("tiny-")]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(ids)
    assert [r["id"] for r in json.loads((out / "sweep.json").read_text())["runs"]] == ids
    for rid in ids:
        assert _lora_numel(load_file(str(out / "runs" / rid / "adapter_model.safetensors")).items()) == 18432
    ranks = {rid.split("-")[1]: {r["name"]: r["rank"] for r in json.loads(
        (out / "runs" / rid / "plan.json").read_text())["layers"]} for rid in ids}
    assert set(ranks["uniform"].values()) == {2} and len(ranks["uniform"]) == 12
    depth = ranks["depth"]
    assert sum(r for n, r in depth.items() if ".5." in n) > sum(r for n, r in depth.items() if ".0." in n)
    assert "2 already finished, 0 ran" in again
    events = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert sorted(e["run"] for e in events if e["event"] == "start") == sorted(ids)


# ----- docs/eval.md, predict.md, merge.md: against plain transformers + peft on the same adapter ------------------


def _train_tiny(d, rows: str) -> None:
    _tiny_csv(d / "tiny.csv", rows)
    _cli("train", "minilm", "--data", d / "tiny.csv", "--rank", "2", "--max-steps", "2", "--max-length", "32",
         "--out", d / "tiny", "-q")


def _mcc(y, p) -> float:
    """Matthews correlation of two binary label lists, by its formula (0 when a margin is empty)."""
    tp = sum(a == 1 and b == 1 for a, b in zip(y, p))
    tn = sum(a == 0 and b == 0 for a, b in zip(y, p))
    fp = sum(a == 0 and b == 1 for a, b in zip(y, p))
    fn = sum(a == 1 and b == 0 for a, b in zip(y, p))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def test_eval_metrics_equal_plain_peft_predictions(minilm, tmp_path):
    """docs/eval.md blocks 0-1: `rankwise eval` and `evaluate_run` on held_out.csv give the accuracy and MCC of the
    adapter's own predictions, computed with plain peft and the formulas."""
    from rankwise.training import evaluate_run

    _train_tiny(tmp_path, "text,label\na good film,1\nan awful film,0\n")
    texts, labels = ["a good film", "an awful film", "awful"], [1, 0, 0]
    (tmp_path / "held_out.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    _cli("eval", tmp_path / "tiny", "--data", tmp_path / "held_out.csv", "-q", "--out", tmp_path / "metrics.json")
    model, tok = _plain_peft(tmp_path / "tiny", 2)
    pred = _logits(model, tok, texts).argmax(-1).tolist()
    accuracy = sum(p == y for p, y in zip(pred, labels)) / 3
    for m in (json.loads((tmp_path / "metrics.json").read_text()),
              evaluate_run(tmp_path / "tiny", tmp_path / "held_out.csv", progress=False)):
        assert m["num_samples"] == 3
        assert m["eval_accuracy"] == pytest.approx(accuracy) and m["eval_mcc"] == pytest.approx(_mcc(labels, pred))


def test_predict_labels_and_scores_equal_plain_peft(minilm, tmp_path):
    """docs/predict.md block 0: each printed label is the argmax class named by the sorted label names
    (negative, positive), its score that class's softmax probability, from plain peft's logits."""
    _train_tiny(tmp_path, "text,sentiment\na good film,positive\nan awful film,negative\n")
    texts = ["what a good film", "awful"]
    out, _ = _cli("predict", tmp_path / "tiny", "--text", texts[0], "--text", texts[1], "--device", "cpu")
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    model, tok = _plain_peft(tmp_path / "tiny", 2)
    logits = _logits(model, tok, texts)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert [r["text"] for r in rows] == texts
    assert [r["label"] for r in rows] == [["negative", "positive"][i] for i in probs.argmax(-1)]
    assert [r["score"] for r in rows] == pytest.approx(probs.max(-1).tolist(), abs=1e-5)


def test_merged_model_logits_equal_the_adapters(minilm, tmp_path):
    """docs/merge.md blocks 0-1: the merged folder, loaded with plain transformers, gives the logits of the base +
    adapter loaded with plain peft, and names the three classes in sorted order."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _train_tiny(tmp_path, "text,sentiment\na good film,positive\nan awful film,negative\nit was a film,neutral\n")
    _cli("merge", tmp_path / "tiny", "--out", tmp_path / "merged", "-q")
    texts = ["a good film", "an awful film", "it was a film", "something else entirely"]
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    model, tok = _plain_peft(tmp_path / "tiny", 3)
    want = _logits(model, tok, texts)
    got = _logits(merged, AutoTokenizer.from_pretrained(str(tmp_path / "merged")), texts)
    assert np.abs(want - got).max() < 1e-5 and np.abs(want).max() > 1e-3
