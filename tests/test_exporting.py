"""`rankwise export` for plain LoRA runs: exact copy loads in plain peft; SVD compression against numpy's SVD."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import minilm_or_skip
from rankwise.cli import main
from rankwise.training.run import train_model
from test_training_fixtures import save_tiny_bert, sentences, write_jsonl

FAST = dict(max_steps=3, batch_size=4, max_length=32, progress=False, device="cpu", lr=5e-2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny BERT and one run for the whole module: every test only reads them (exports go elsewhere)."""
    root = tmp_path_factory.mktemp("exporting")
    bert = save_tiny_bert(root / "tiny-bert", minilm_or_skip())
    rows = [{"sentence": t, "label": y} for t, y in sentences(24)]
    data = root / "data"
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:8])
    out = root / "run"
    train_model(str(bert), data, out=out, strategy="depth", budget_rank=4, targets="all-linear", **FAST)
    return bert, out


@pytest.fixture
def run_dir(trained):
    return trained[1]


@pytest.fixture
def tiny_bert_dir(trained):
    return trained[0]


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _deltas(folder) -> dict[str, np.ndarray]:
    """Scaled deltas s*B@A per module, computed by hand from the saved files (peft: s = alpha / r)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    w = _weights(folder)
    out = {}
    for k, a in w.items():
        if k.endswith("lora_A.weight"):
            name = k[: -len(".lora_A.weight")].removeprefix("base_model.model.")
            b = w[k.replace("lora_A", "lora_B")]
            alpha = next((v for p, v in cfg["alpha_pattern"].items() if p.replace("\\", "") == name), cfg["lora_alpha"])
            out[name] = (alpha / a.shape[0]) * (b.astype(np.float64) @ a.astype(np.float64))
    return out


def _logits_in_fresh_process(base_dir, *adapter_dirs) -> list:
    """Logits of each adapter on the base model, from one fresh process that never imports rankwise."""
    code = (
        "import json,sys,torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "out = []\n"
        f"for adapter in {[str(d) for d in adapter_dirs]!r}:\n"
        f"    base = AutoModelForSequenceClassification.from_pretrained({str(base_dir)!r}, num_labels=2)\n"
        "    m = PeftModel.from_pretrained(base, adapter).eval()\n"
        "    tok = AutoTokenizer.from_pretrained(adapter)\n"
        "    enc = tok(['good movie', 'the plot was awful'], return_tensors='pt', padding=True)\n"
        "    with torch.no_grad(): out.append(m(**enc).logits.tolist())\n"
        "print(json.dumps(out))\n"
        "assert 'rankwise' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_exact_export_loads_in_plain_peft(run_dir, tmp_path, tiny_bert_dir):
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--out", str(out), "-q"]) == 0
    # same tensors as the run, and the same logits from a process that never imports rankwise
    a, b = _weights(run_dir), _weights(out)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    ref, got = map(np.array, _logits_in_fresh_process(tiny_bert_dir, run_dir, out))
    assert ref.shape == (2, 2) and np.abs(ref - got).max() <= 1e-5
    assert json.loads((out / "task.json").read_text())["method"] == "lora"


def test_rank_compression_is_truncated_svd(run_dir, tmp_path):
    out = tmp_path / "r1"
    assert main(["export", str(run_dir), "--out", str(out), "--rank", "1", "-q"]) == 0
    before, after = _deltas(run_dir), _deltas(out)
    assert set(after) <= set(before)
    for name, d in before.items():
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        best = s[0] * np.outer(u[:, 0], vt[0])  # Eckart-Young: the best rank-1 approximation
        assert np.allclose(after[name], best, atol=1e-6), name


def test_energy_compression_keeps_the_energy(run_dir, tmp_path):
    out = tmp_path / "e"
    assert main(["export", str(run_dir), "--out", str(out), "--energy", "0.9", "-q"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    for name, d in _deltas(run_dir).items():
        s = np.linalg.svd(d, compute_uv=False)
        share = np.cumsum(s ** 2) / np.sum(s ** 2)
        k = int(np.searchsorted(share, 0.9 - 1e-12)) + 1  # fewest components reaching 90%
        key = next(p for p in cfg["rank_pattern"] if p.replace("\\", "") == name)
        assert cfg["rank_pattern"][key] == k


@pytest.mark.parametrize("argv, needle", [
    (["--rank", "0"], "--rank must be >= 1"),
    (["--energy", "1.5"], "--energy must be in (0, 1]"),
    (["--format", "onnx"], "unknown export format"),
])
def test_bad_export_options(run_dir, tmp_path, capsys, argv, needle):
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x"), "-q", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_export_of_a_non_run_folder(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a rankwise run folder" in capsys.readouterr().err
