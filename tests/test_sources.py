"""Weight sources: live modules, safetensors folders (single, sharded, GPT-2 Conv1D), fallbacks, errors, memory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from rankwise.stats import analyze  # noqa: E402
from rankwise.stats.sources import checkpoint_layers, checkpoint_source, module_source, open_source  # noqa: E402
from rankwise.targets import adaptable_layers  # noqa: E402
from rankwise.types import RankwiseError  # noqa: E402


def _by_name(stats):
    return {s.name: s for s in stats}


def assert_same_stats(a, b, rtol=1e-9):
    da, db = _by_name(a), _by_name(b)
    assert sorted(da) == sorted(db)
    for name, s in da.items():
        assert s.info == db[name].info, name
        for key, value in s.metrics.items():
            assert np.isclose(value, db[name].metrics[key], rtol=rtol, equal_nan=True), (name, key)


def test_module_source_order_and_heads(bert):
    stats = analyze(bert, progress=False)
    expected = [lay.name for lay in adaptable_layers(bert) if "pooler" not in lay.name]
    assert [s.name for s in stats] == expected  # module order preserved, pooler (a head) excluded
    assert len(stats) == 12


def test_safetensors_folder_equals_module(bert, bert_dir):
    from_path = analyze(bert_dir, progress=False)
    assert_same_stats(from_path, analyze(bert, progress=False))
    names = [s.name for s in from_path]
    assert not any("embeddings" in n or "pooler" in n for n in names)
    # natural order: every block-0 layer before block 1
    assert [s.info.depth for s in from_path] == sorted(s.info.depth for s in from_path)


def test_single_safetensors_file_and_str_path(bert_dir):
    assert_same_stats(analyze(bert_dir / "model.safetensors", progress=False), analyze(str(bert_dir), progress=False))


def test_sharded_checkpoint(bert, tmp_path):
    d = tmp_path / "sharded"
    bert.save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2
    assert_same_stats(analyze(d, progress=False), analyze(bert, progress=False))


def test_checkpoint_targets(bert_dir):
    stats = analyze(bert_dir, ["query", "attention.output.dense"], progress=False)
    assert sorted(s.name for s in stats) == sorted(
        [f"encoder.layer.{i}.attention.self.query" for i in range(2)]
        + [f"encoder.layer.{i}.attention.output.dense" for i in range(2)]
    )
    regex = analyze(bert_dir, r"encoder\.layer\.1\..*", progress=False)
    assert len(regex) == 6 and all(s.info.depth == 1 for s in regex)


@pytest.mark.parametrize("source", ["module", "path"])
def test_targets_matching_nothing_is_an_error(bert, bert_dir, source):
    src = bert if source == "module" else bert_dir
    with pytest.raises(RankwiseError, match="match no adaptable"):
        analyze(src, ["no_such_module"], progress=False)


def test_nonexistent_path_is_an_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(RankwiseError, match="nope.*does not exist"):
        analyze(missing, progress=False)
    with pytest.raises(RankwiseError, match="does not exist"):
        analyze(str(missing) + "/model", progress=False)
    with pytest.raises(RankwiseError, match="nn.Module or a path"):
        analyze(42, progress=False)


def test_unloadable_hub_id_is_an_error():
    with pytest.raises(RankwiseError, match="no-such-org/no-such-model"):
        analyze("no-such-org/no-such-model", progress=False)


def test_conv1d_is_transposed_in_module_and_checkpoint(gpt2, tmp_path):
    src = module_source(gpt2)
    kinds = {info.name: info.kind for info in src.layers}
    assert kinds["transformer.h.0.attn.c_attn"] == "conv1d"
    for info, w in src:
        raw = gpt2.get_submodule(info.name).weight
        assert tuple(w.shape) == info.shape
        assert torch.equal(w, raw.t() if info.kind == "conv1d" else raw)
    c_attn = next(i for i in src.layers if i.name.endswith("h.0.attn.c_attn"))
    assert c_attn.shape == (96, 32)  # [out, in] = [3 * n_embd, n_embd]

    d = tmp_path / "gpt2"
    gpt2.save_pretrained(d)
    layers, _ = checkpoint_layers(d)
    ck = {lay.name: lay for lay in layers}
    for info in src.layers:
        if info.kind == "conv1d":
            assert ck[info.name].kind == "conv1d" and ck[info.name].shape == info.shape
    for info, w in checkpoint_source(d):
        assert tuple(w.shape) == info.shape
    assert_same_stats(analyze(d, progress=False), analyze(gpt2, progress=False))


def test_llama_checkpoint_equals_module(llama, tmp_path):
    d = tmp_path / "llama"
    llama.save_pretrained(d)
    from_path = analyze(d, progress=False)
    assert_same_stats(from_path, analyze(llama, progress=False))
    assert not any("lm_head" in s.name or "embed" in s.name for s in from_path)
    assert {s.info.module_type for s in from_path} == {"attention", "mlp"}


def test_folder_without_safetensors_falls_back_to_transformers(bert, tmp_path):
    d = tmp_path / "bin"
    bert.config.save_pretrained(d)
    torch.save(bert.state_dict(), d / "pytorch_model.bin")
    src = open_source(d)
    assert src.origin == "BertModel"
    assert_same_stats(analyze(d, progress=False), analyze(bert, progress=False))


def test_batching_by_bytes_gives_identical_results(bert, bert_dir):
    one_by_one = analyze(bert_dir, batch_bytes=0, progress=False)
    for bb in (32 * 32 * 8 * 3, 1 << 30):
        assert_same_stats(analyze(bert_dir, batch_bytes=bb, progress=False), one_by_one, rtol=1e-12)
    sizes = [len(b) for b in checkpoint_source(bert_dir).batches(32 * 32 * 8 * 3)]
    assert max(sizes) <= 3 and sum(sizes) == 12
    with pytest.raises(RankwiseError, match="batch_bytes"):
        analyze(bert, batch_bytes=-1, progress=False)


def test_progress_false_is_silent(bert_dir, capsys):
    analyze(bert_dir, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_to_dict_is_json_ready(bert_dir):
    row = analyze(bert_dir, ["query"], progress=False)[0].to_dict()
    assert row["shape"] == [32, 32] and row["kind"] == "linear" and row["module_type"] == "attention"
    json.dumps(row)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import rankwise.stats as s

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    s.analyze(sys.argv[2], progress=False)                 # warm up imports and allocator on a tiny model
    open("/proc/self/clear_refs", "w").write("5")          # reset VmHWM to the current RSS
    base = status("VmRSS")
    stats = s.analyze(sys.argv[1], progress=False, batch_bytes=int(sys.argv[3]))
    print(json.dumps({"peak_increase": status("VmHWM") - base, "layers": len(stats)}))
    """
)


def write_checkpoint(folder, n_layers: int, out_f: int, in_f: int) -> int:
    """A BERT-named checkpoint of n_layers random float32 [out, in] weights; returns its size in bytes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {f"encoder.layer.{i}.intermediate.dense.weight": torch.randn(out_f, in_f, generator=g)
               for i in range(n_layers)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return (folder / "model.safetensors").stat().st_size


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure peak RSS")
def test_checkpoint_peak_memory_is_bounded_by_batches_not_model(tmp_path, bert_dir):
    # 48 x (256 x 4096) float32 = 192 MiB on disk; one 8 MiB float64 layer per batch. Small Gram matrices and
    # single-threaded BLAS keep it fast even when other jobs load the CPU (this measures memory, not speed).
    size = write_checkpoint(tmp_path / "big", 48, 256, 4096)
    one_thread = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "big"), str(bert_dir), str(8 << 20)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1", **one_thread),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["layers"] == 48
    assert result["peak_increase"] < size / 3, (result, size)


def _one_blas_thread():
    """Single-threaded BLAS/LAPACK: multithreaded SVDs slow down 10-100x when other jobs load the CPU."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


@pytest.mark.slow
def test_minilm_alpha_matches_weightwatcher(minilm, capsys):
    from conftest import require

    require("weightwatcher", "weightwatcher not installed (pip install weightwatcher==0.7.7)")  # CI: fails
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    import weightwatcher as ww
    from transformers import AutoModel

    ours = _by_name(analyze(minilm, progress=False))
    assert len(ours) == 36
    watcher = ww.WeightWatcher(model=AutoModel.from_pretrained(minilm))
    with warnings.catch_warnings(), _one_blas_thread():
        warnings.simplefilter("ignore")  # WeightWatcher's own pandas deprecation noise
        desc = watcher.describe()
        ids = [int(i) for i, n in zip(desc["layer_id"], desc["longname"]) if n in ours]  # not the 30522-row embedding
        df = watcher.analyze(layers=ids, plot=False)
    df = df.set_index("longname")
    assert len(df) == 36
    for name, s in ours.items():
        assert s.metrics["alpha"] == pytest.approx(df.loc[name, "alpha"], rel=1e-6), name
        assert s.metrics["spectral_norm"] == pytest.approx(df.loc[name, "spectral_norm"], rel=1e-5), name
        assert s.metrics["stable_rank"] == pytest.approx(df.loc[name, "stable_rank"], rel=1e-5), name
    capsys.readouterr()
