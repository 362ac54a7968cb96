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
