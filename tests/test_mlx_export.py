"""rankwise export --format mlx: exact zero-padding and scale folding (pure numpy), mlx-lm logits equal to peft's
(when mlx-lm installs), --merge, --with-base, and one-line errors.

The run folder holds a tiny Llama and a hand-made peft adapter with a non-uniform pattern: block 0 adapts k_proj
only (so mlx-lm wraps keys there that the run never adapted), ranks 1..4, and one layer whose scale differs from the
others (so its scale is folded into lora_b). B is random, not zero.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import minilm_path, missing
from rankwise.cli import main

# module -> (rank, alpha); peft's scale alpha/r is 2 everywhere except v_proj (5): one folded layer
PATTERN = {
    "model.layers.0.self_attn.k_proj": (3, 6.0),
    "model.layers.1.self_attn.q_proj": (4, 8.0),
    "model.layers.1.self_attn.v_proj": (1, 5.0),
    "model.layers.1.mlp.down_proj": (2, 4.0),
}
IDS = [[5, 17, 99, 230, 1024, 7, 2048, 31]]
# float32 on both sides: the only differences are summation order inside matmuls/norms (~1e-7 relative per op,
# a few dozen ops deep); 1e-4 of the logits' scale leaves ~100x headroom and is still ~1000x below the adapter's
# own effect on the logits (asserted below, so the comparison cannot pass with the adapter ignored).
RTOL = 1e-4

needs_mlx = pytest.mark.skipif(
    importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None,
    reason="mlx/mlx-lm not installed (pip install 'mlx[cpu]' mlx-lm; Linux x86-64 needs glibc >= 2.35)")


def _save_llama(dst, tok_src, cls="Llama"):
    import transformers

    torch.manual_seed(0)
    kw = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=30522, max_position_embeddings=128,
              rope_parameters={"rope_type": "default", "rope_theta": 100000.0})  # SmolLM2's theta, not mlx's default
    getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**kw)).save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tok_src / name).is_file():
            shutil.copy(tok_src / name, dst / name)
    return dst


def _make_run(root, cls="Llama"):
    """A run folder as `rankwise train` writes it for a causal LM (task.json, tokenizer, peft adapter), with the
    adapter of PATTERN and random A and B. Built directly: training is not what these tests are about."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = minilm_path()
    if tok is None:
        missing("MiniLM not installed (its tokenizer serves the tiny models): make install")
    base = _save_llama(root / f"tiny-{cls.lower()}", tok, cls)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=list(PATTERN), task_type="CAUSAL_LM",
                     rank_pattern={k: r for k, (r, _) in PATTERN.items()},
                     alpha_pattern={k: a for k, (_, a) in PATTERN.items()})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    run = root / "run"
    model.save_pretrained(run)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, run / name)
    task = {"schema": 1, "task": "causal-lm", "method": "lora", "base_model": str(base),
            "base_model_path": str(base), "max_length": 32, "prompt_template": None, "data": {"kind": "text"}}
    (run / "task.json").write_text(json.dumps(task))
    return base, run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("mlx"))


def _export(tmp_path, run, name, *flags):
    out = tmp_path / name
    assert main(["export", str(run), "--format", "mlx", "--out", str(out), "-q", *flags]) == 0
    return out


def _peft_logits(base, run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base).eval()
        before = plain(torch.tensor(IDS)).logits[0].double().numpy()
        model = PeftModel.from_pretrained(plain, str(run)).eval()
        return model(torch.tensor(IDS)).logits[0].double().numpy(), before


def _mlx_logits(model_dir, adapter=None):
    import mlx.core as mx
    from mlx_lm.utils import load

    model, _ = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    return np.array(model(mx.array(IDS)).astype(mx.float32))[0].astype(np.float64)


def _close(got, want, before):
    scale = np.abs(want).max()
    assert np.abs(want - before).max() > 100 * RTOL * scale  # the adapter visibly moves the logits
    assert np.abs(got - want).max() <= RTOL * scale


def test_padding_and_scale_folding_is_exact(tiny_run, tmp_path):
    """Pure numpy: scale * lora_a @ lora_b must be (alpha/r * B @ A).T per block and key, zero elsewhere."""
    from safetensors.numpy import load_file

    _, run = tiny_run
    out = _export(tmp_path, run, "mlx")
    cfg = json.loads((out / "adapter_config.json").read_text())
    lp = cfg["lora_parameters"]
    keys = sorted({k.split(".", 3)[3] for k in PATTERN})
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2  # block 0 adapted: both blocks
    assert lp["rank"] == 4 and lp["scale"] == 2.0 and lp["keys"] == keys and lp["dropout"] == 0.0
    got = load_file(str(out / "adapters.safetensors"))
    peft = load_file(str(run / "adapter_model.safetensors"))
    assert len(got) == 2 * 2 * len(keys)
    for i in (0, 1):
        for k in keys:
            name = f"model.layers.{i}.{k}"
            a, b = got[f"{name}.lora_a"], got[f"{name}.lora_b"]
            assert a.shape[1] == b.shape[0] == 4
            delta = lp["scale"] * a.astype(np.float64) @ b.astype(np.float64)
            if name not in PATTERN:
                assert not a.any() and not b.any()
                continue
            r, alpha = PATTERN[name]
            A = peft[f"base_model.model.{name}.lora_A.weight"].astype(np.float64)
            B = peft[f"base_model.model.{name}.lora_B.weight"].astype(np.float64)
            want = (alpha / r * B @ A).T
            assert np.abs(delta - want).max() <= 1e-6 * np.abs(want).max()
            assert not a[:, r:].any() and not b[r:].any()
            if alpha / r == lp["scale"]:  # unfolded layers are copied bit for bit
                assert np.array_equal(b[:r], B.T.astype(np.float32))


def test_num_layers_counts_back_from_the_last_block():
    """mlx-lm wraps the LAST num_layers blocks: adapting blocks 2 and 4 of 6 needs 4, with zeros in 3 and 5."""
    from rankwise.mlx_export import mlx_adapter_tensors

    g = torch.Generator().manual_seed(0)
    deltas = {(2, "self_attn.q_proj"): (torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g), 0.5),
              (4, "mlp.up_proj"): (torch.randn(3, 8, generator=g), torch.randn(5, 3, generator=g), 0.5)}
    tensors, params = mlx_adapter_tensors(deltas, 6)
    assert params["num_layers"] == 4 and params["lora_parameters"]["rank"] == 3
    assert sorted({int(k.split(".")[2]) for k in tensors}) == [2, 3, 4, 5]
    assert tensors["model.layers.2.mlp.up_proj.lora_a"].shape == (8, 3)
    assert tensors["model.layers.2.self_attn.q_proj.lora_b"].shape == (3, 6)
    for i, k in [(2, "mlp.up_proj"), (3, "self_attn.q_proj"), (5, "mlp.up_proj"), (4, "self_attn.q_proj")]:
        assert not tensors[f"model.layers.{i}.{k}.lora_b"].any()
    a, b, s = deltas[(4, "mlp.up_proj")]
    got = 0.5 * tensors["model.layers.4.mlp.up_proj.lora_a"] @ tensors["model.layers.4.mlp.up_proj.lora_b"]
    assert torch.allclose(got, (s * b @ a).T, rtol=0, atol=1e-6)


@needs_mlx
def test_mlx_lm_logits_match_peft(tiny_run, tmp_path):
    base, run = tiny_run
    out = _export(tmp_path, run, "mlx", "--with-base")
    assert json.loads((out / "base" / "config.json").read_text())["rope_theta"] == 100000.0
    want, before = _peft_logits(base, run)
    _close(_mlx_logits(out / "base", adapter=out), want, before)


@needs_mlx
def test_merge_matches_peft_in_mlx_and_torch(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    base, run = tiny_run
    out = _export(tmp_path, run, "fused", "--merge")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    want, before = _peft_logits(base, run)
    _close(_mlx_logits(out), want, before)
    with torch.no_grad():
        fused = AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor(IDS)).logits[0].double().numpy()
    _close(fused, want, before)


@needs_mlx
def test_mistral_loads_too(tmp_path):
    base, run = _make_run(tmp_path, "Mistral")
    out = _export(tmp_path, run, "mlx", "--with-base")
    want, before = _peft_logits(base, run)
    _close(_mlx_logits(out / "base", adapter=out), want, before)


def test_note_when_mlx_lm_would_misread_the_base(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    capsys.readouterr()
    _export(tmp_path, run, "mlx")
    err = capsys.readouterr().err
    assert "rope_theta" in err and "--with-base" in err


def _edited_run(tmp_path, run, **changes):
    bad = tmp_path / "bad-run"
    shutil.copytree(run, bad)
    task = json.loads((bad / "task.json").read_text())
    (bad / "task.json").write_text(json.dumps({**task, **changes}))
    return bad


def _error(capsys, *argv):
    capsys.readouterr()
    code = main(["export", *map(str, argv), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_errors(tiny_run, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, run = tiny_run
    err = _error(capsys, _edited_run(tmp_path / "a", run, task="seq-cls"), "--format", "mlx", "--out", tmp_path / "o")
    assert "Llama-family" in err and "seq-cls" in err
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)).save_pretrained(gpt2)
    err = _error(capsys, _edited_run(tmp_path / "b", run, base_model_path=str(gpt2), base_model=str(gpt2)),
                 "--format", "mlx", "--out", tmp_path / "o")
    assert "Llama-family" in err and "gpt2" in err
    err = _error(capsys, run, "--format", "mlx", "--merge", "--with-base", "--out", tmp_path / "o")
    assert "--with-base" in err
    assert not (tmp_path / "o").exists()


def test_error_for_modules_outside_the_blocks(tiny_run, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, run = tiny_run
    bad = _edited_run(tmp_path, run)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (bad / f).unlink()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, target_modules=["lm_head", "q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(bad, save_embedding_layers=False)
    err = _error(capsys, bad, "--format", "mlx", "--out", tmp_path / "o")
    assert "model.layers.N" in err and "lm_head" in err
