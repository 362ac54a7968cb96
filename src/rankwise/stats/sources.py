"""Where weights come from: a live nn.Module, or a safetensors checkpoint read tensor by tensor.

Either way a source yields (LayerInfo, weight as [out, in]) pairs for the selected layers, in batches whose
float64 working size is bounded by `batch_bytes`. A safetensors folder is never turned into a model: each
batch opens the file(s), copies out its tensors and closes them again, so neither the copies nor the
memory-mapped pages (which count towards RSS while mapped) add up to the checkpoint size.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..targets import adaptable_layers, depth_of, module_type_of, select_layers
from ..types import LayerInfo, RankwiseError

__all__ = [
    "CONV1D_MODEL_TYPES",
    "EMBEDDING_WORDS",
    "WeightSource",
    "open_source",
    "module_source",
    "checkpoint_source",
    "checkpoint_layers",
    "load_model",
]

# Model types whose projections are transformers' Conv1D, stored as [in, out].
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
_CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# 2-D `.weight` tensors that are lookup tables, not linear maps (T5's relative_attention_bias is an Embedding).
EMBEDDING_WORDS = ("embed", "wte", "wpe", "position", "token_type", "shared", "relative_attention_bias")
_INDEX_FILE = "model.safetensors.index.json"
_F64 = 8  # bytes per element of the float64 working copy each weight becomes


Pair = tuple[LayerInfo, torch.Tensor]


@dataclass
class WeightSource:
    """Selected layers (known before any weight is read) and a way to read them in bounded batches."""

    layers: list[LayerInfo]
    _read: Callable[[Sequence[LayerInfo]], list[torch.Tensor]]
    origin: str = ""

    def batches(self, batch_bytes: int = 0) -> Iterator[list[Pair]]:
        """Consecutive layers grouped so each group's float64 size stays <= batch_bytes (at least one layer)."""
        group: list[LayerInfo] = []
        size = 0
        for info in self.layers:
            need = info.out_features * info.in_features * _F64
            if group and size + need > batch_bytes:
                yield list(zip(group, self._read(group)))
                group, size = [], 0
            group.append(info)
            size += need
        if group:
            yield list(zip(group, self._read(group)))

    def __iter__(self) -> Iterator[Pair]:
        for batch in self.batches(0):
            yield from batch

    def __len__(self) -> int:
        return len(self.layers)


# ---------------------------------------------------------------- live modules


def module_source(model: nn.Module, targets=None) -> WeightSource:
    """Layers of a live model (nn.Linear and GPT-2 Conv1D), in module order; weights detached, Conv1D transposed."""
    layers = select_layers(adaptable_layers(model), targets)

    def read(group: Sequence[LayerInfo]) -> list[torch.Tensor]:
        out = []
        for info in group:
            w = model.get_submodule(info.name).weight.detach()
            out.append(w.t() if info.kind == "conv1d" else w)
        return out

    return WeightSource(layers, read, origin=type(model).__name__)


# ---------------------------------------------------------------- safetensors checkpoints


@contextmanager
def _open(f: Path, **kw):
    """safe_open, with a truncated or corrupt file reported as one line naming it (not a Rust error)."""
    from safetensors import SafetensorError, safe_open

    try:
        fh = safe_open(str(f), "pt", **kw)
    except SafetensorError as e:
        raise RankwiseError(f"{f} is not a readable safetensors file (truncated or corrupt: {e})") from None
    with fh:
        yield fh


def _natural_key(name: str):
    # Blocks in numeric order (layer.2 before layer.10); safetensors stores tensors sorted as strings.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _tensor_files(path: Path) -> dict[str, Path]:
    """tensor name -> file holding it, for one .safetensors file or a (possibly sharded) folder."""
    if path.is_file():
        files = [path]
    elif (path / _INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / _INDEX_FILE).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise RankwiseError(f"{path / _INDEX_FILE} is not a valid safetensors index ({e})") from None
        return {name: path / fname for name, fname in weight_map.items()}
    else:
        files = sorted(path.glob("*.safetensors"))
    found: dict[str, Path] = {}
    for f in files:
        with _open(f) as fh:
            found.update((k, f) for k in fh.keys())
    return found


def _model_type(folder: Path) -> str:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return ""
    try:
        return str(json.loads(cfg.read_text()).get("model_type", ""))
    except ValueError:
        return ""


def _is_linear_candidate(name: str, shape: Sequence[int]) -> bool:
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    low = name.lower()
    return not any(word in low for word in EMBEDDING_WORDS)


def checkpoint_layers(path: Path) -> tuple[list[LayerInfo], dict[str, tuple[str, Path]]]:
    """Every linear-layer tensor of a safetensors checkpoint, by its header only (no tensor is read).

    Returns the LayerInfos in natural name order and {layer name: (tensor name, file)}.
    """
    files = _tensor_files(path)
    folder = path if path.is_dir() else path.parent
    conv1d_model = _model_type(folder) in CONV1D_MODEL_TYPES
    by_file: dict[Path, list[str]] = {}
    for tname, f in files.items():
        by_file.setdefault(f, []).append(tname)
    layers, where = [], {}
    for f, names in by_file.items():
        if not f.is_file():
            raise RankwiseError(f"checkpoint shard {f} listed in {_INDEX_FILE} is missing")
        with _open(f) as fh:
            for tname in names:
                shape = fh.get_slice(tname).get_shape()
                if not _is_linear_candidate(tname, shape):
                    continue
                name = tname[: -len(".weight")]
                conv1d = conv1d_model and name.rsplit(".", 1)[-1] in _CONV1D_LEAVES
                out_f, in_f = (shape[1], shape[0]) if conv1d else (shape[0], shape[1])
                kind = "conv1d" if conv1d else "linear"
                layers.append(LayerInfo(name, int(out_f), int(in_f), kind, module_type_of(name), depth_of(name)))
                where[name] = (tname, f)
    layers.sort(key=lambda lay: _natural_key(lay.name))
    return layers, where


def checkpoint_source(path: str | os.PathLike, targets=None) -> WeightSource:
    """Selected layers of a safetensors file or folder, read lazily tensor by tensor."""
    path = Path(path)
    layers, where = checkpoint_layers(path)
    layers = select_layers(layers, targets)

    def read(group: Sequence[LayerInfo]) -> list[torch.Tensor]:
        by_file: dict[Path, list[int]] = {}
        for i, info in enumerate(group):
            by_file.setdefault(where[info.name][1], []).append(i)
        out: list[torch.Tensor | None] = [None] * len(group)
        for f, idx in by_file.items():
            # Opened per batch and closed right after: the copies below outlive the mapping.
            with _open(f, device="cpu") as fh:
                for i in idx:
                    w = fh.get_tensor(where[group[i].name][0])
                    out[i] = w.t() if group[i].kind == "conv1d" else w
        return out  # type: ignore[return-value]

    return WeightSource(layers, read, origin=str(path))


# ---------------------------------------------------------------- anything else: build the model


def load_model(source: str | os.PathLike) -> nn.Module:
    """transformers.AutoModel for a folder without safetensors (pytorch_model.bin, GGUF) or a hub id."""
    from transformers import AutoModel

    kwargs = {"trust_remote_code": False}
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        path, kwargs["gguf_file"] = path.parent, path.name
    elif path.is_dir() and not (path / "config.json").is_file():
        gguf = sorted(path.glob("*.gguf"))
        if gguf:
            kwargs["gguf_file"] = gguf[0].name
    try:
        return AutoModel.from_pretrained(str(path) if path.exists() else str(source), **kwargs)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError... for unloadable models
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankwiseError(
            f"cannot load {str(source)!r} as a model: {first} (give an nn.Module, a safetensors folder, "
            "a transformers model folder, or a hub id when online)"
        ) from None


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text)) and not text.startswith((".", "-"))


def open_source(source, targets=None) -> WeightSource:
    """An nn.Module, a safetensors file/folder, any other transformers folder or file, or a hub id."""
    if isinstance(source, nn.Module):
        return module_source(source, targets)
    if not isinstance(source, (str, os.PathLike)):
        raise RankwiseError(
            f"analyze takes an nn.Module or a path (str/Path), got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.exists():
        is_st_file = path.is_file() and path.suffix == ".safetensors"
        if is_st_file or (path.is_dir() and (any(path.glob("*.safetensors")) or (path / _INDEX_FILE).is_file())):
            return checkpoint_source(path, targets)
        return module_source(load_model(path), targets)
    if isinstance(source, str) and _looks_like_hub_id(source):
        return module_source(load_model(source), targets)
    raise RankwiseError(f"model path {str(source)!r} does not exist (give an existing folder/file or a hub id)")
