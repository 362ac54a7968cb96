"""What the doc examples print or write, checked against hand computation (tests/test_docs.py only checks that they
run). The same commands as the docs, in-process through `rankwise.cli.main`, on the embedded MiniLM; the reference
numbers come from its safetensors file read with numpy, never from rankwise."""

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
