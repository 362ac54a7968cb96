"""EXPORT for Apple's MLX: a run's LoRA as the adapter folder mlx-lm loads, or as a fused mlx-lm model folder.

    rankwise export RUN --format mlx --out DIR              # DIR/adapters.safetensors + DIR/adapter_config.json
    rankwise export RUN --format mlx --out DIR --with-base  # ... + DIR/base/, a base folder mlx-lm reads right
    rankwise export RUN --format mlx --out DIR --merge      # DIR = config.json + model.safetensors (delta fused)

mlx-lm (tuner/utils.py) has ONE rank and ONE scale for every LoRA layer and computes `y + scale * x @ a @ b`
with a (in, r), b (r, out). It wraps the modules named by `keys` (relative to a decoder block) in the LAST
`num_layers` blocks, then loads the file with shape checks. So, exactly:
  - every layer is zero-padded to the largest rank R (zero columns of a / rows of b add nothing);
  - the global scale is the most common per-layer scale; a layer with another scale has s_layer/s_global folded
    into its b (a layer with the common scale is copied bit for bit);
  - num_layers reaches back to the first adapted block, keys are every adapted module kind, and each (block, key)
    the run did not adapt gets explicit zero tensors (mlx-lm would otherwise keep its random a with zero b).
mlx-lm reads the base model's config.json itself; transformers >= 5 writes rope settings only under
`rope_parameters`, which mlx-lm's llama ignores (it would silently use rope_theta 10000), so every config.json this
module writes carries them at the top level too (`mlx_config`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch

from .methods import PlainLora, method_of_run
from .methods.plain import lora_deltas
from .types import RankwiseError

__all__ = ["save_mlx", "mlx_adapter_tensors", "mlx_config", "SUPPORTED_MODEL_TYPES"]

# model_type -> mlx-lm module whose parameter names equal transformers' (mistral is mapped to llama by mlx-lm)
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_SUPPORTED = "causal-LM runs of Llama-family models (model_type llama or mistral, e.g. SmolLM2, TinyLlama, Llama 2/3)"
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "vocab", "merges")


def save_mlx(plain: PlainLora, run_dir: Path, out: Path, *, merge: bool = False, with_base: bool = False,
             **_) -> None:
    """Write the mlx-lm adapter folder (or, with merge, a fused mlx-lm model folder) for `plain` to `out`."""
    if merge and with_base:
        raise RankwiseError("--with-base is for the adapter export; --merge already writes a whole model")
    run_dir = Path(run_dir)
    task = json.loads((run_dir / "task.json").read_text())
    base = _base_folder(task)
    config = _check_supported(task, base)
    deltas = _layer_deltas(plain)
    provenance = {"run": str(run_dir.resolve()), "method": method_of_run(run_dir).name,
                  "base_model": task["base_model"], "base_model_path": str(base),
                  "ranks": {f"model.layers.{i}.{k}": int(a.shape[0]) for (i, k), (a, _, _) in deltas.items()}}
    if merge:
        _write_merged(deltas, base, config, run_dir, out)
        (out / "rankwise_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
        return
    tensors, params = mlx_adapter_tensors(deltas, int(config["num_hidden_layers"]))
    from safetensors.torch import save_file

    save_file(tensors, str(out / "adapters.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({**params, "rankwise": provenance}, indent=2) + "\n")
    if with_base:
        _write_base(base, config, run_dir, out / "base")
    elif _misread_keys(config):
        print(f"note: mlx-lm would misread {base}/config.json ({', '.join(_misread_keys(config))} only under "
              "rope_parameters); load the adapter with the hub model, or re-export with --with-base",
              file=sys.stderr)


def mlx_adapter_tensors(deltas: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]],
                        num_hidden_layers: int) -> tuple[dict[str, torch.Tensor], dict]:
    """({mlx-lm tensor name: tensor}, adapter_config.json fields) for {(block, key): (A (r, in), B (out, r), s)}.

    Exact: for every (block, key), scale * lora_a @ lora_b == (s * B @ A).T, zero where the run adapted nothing."""
    rank = max(a.shape[0] for a, _, _ in deltas.values())
    scale = _common_scale([s for _, _, s in deltas.values()])
    keys = sorted({k for _, k in deltas})
    first = min(i for i, _ in deltas)
    dims = {k: (a.shape[1], b.shape[0], a.dtype) for (_, k), (a, b, _) in deltas.items()}  # same in every block
    tensors = {}
    for i in range(first, num_hidden_layers):
        for k in keys:
            n_in, n_out, dtype = dims[k]
            lora_a = torch.zeros(n_in, rank, dtype=dtype)
            lora_b = torch.zeros(rank, n_out, dtype=dtype)
            if (i, k) in deltas:
                a, b, s = deltas[(i, k)]
                if a.shape[1] != n_in or b.shape[0] != n_out:
                    raise RankwiseError(f"model.layers.{i}.{k} has shape {tuple(b.shape[:1]) + tuple(a.shape[1:])},"
                                        f" other blocks ({n_out}, {n_in}); mlx-lm needs one shape per key")
                r = a.shape[0]
                lora_a[:, :r] = a.t()
                # the layer's own scale relative to the global one; 1.0 keeps b bit for bit
                lora_b[:r] = b.t() if s == scale else (b.t().double() * (s / scale)).to(dtype)
            tensors[f"model.layers.{i}.{k}.lora_a"] = lora_a
            tensors[f"model.layers.{i}.{k}.lora_b"] = lora_b
    params = {"fine_tune_type": "lora", "num_layers": num_hidden_layers - first,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys}}
    return tensors, params


def mlx_config(config: dict) -> dict:
    """The base config.json with the fields mlx-lm's llama reads at the top level (rope_theta, rope_scaling,
    tie_word_embeddings: mlx-lm defaults it to True, transformers' Llama to False)."""
    out = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope and "rope_theta" not in config:
            out["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", rope.get("type", "default")) != "default" and not config.get("rope_scaling"):
            out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    out["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    return out


def _misread_keys(config: dict) -> list[str]:
    fixed = mlx_config(config)
    return [k for k in ("rope_theta", "rope_scaling") if fixed.get(k) != config.get(k)]


def _common_scale(scales: list[float]) -> float:
    """The most frequent scale (ties: the largest), so most layers need no folding."""
    counts = Counter(scales)
    return max(counts, key=lambda s: (counts[s], s))


def _base_folder(task: dict) -> Path:
    from .training.runs import _base_path

    base = Path(_base_path(task))
    if not (base / "config.json").is_file():
        raise RankwiseError(f"the run's base model {task['base_model']!r} is not a local model folder ({base}); "
                            "mlx export reads its config.json (and its weights for --merge)")
    return base


def _check_supported(task: dict, base: Path) -> dict:
    config = json.loads((base / "config.json").read_text())
    what = config.get("model_type")
    if task.get("task") != "causal-lm" or what not in SUPPORTED_MODEL_TYPES:
        raise RankwiseError(f"mlx export supports {_SUPPORTED}; this run is a {task.get('task')} run of a "
                            f"{what} model")
    return config


def _layer_deltas(plain: PlainLora) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """{(block index, key inside the block): (A, B, scaling)}; anything mlx-lm's LoRA cannot hold is an error."""
    cfg = plain.config
    if getattr(cfg, "use_dora", False):
        raise RankwiseError("mlx export takes plain LoRA; this run uses DoRA (train without --dora)")
    if getattr(cfg, "fan_in_fan_out", False):
        raise RankwiseError("mlx export needs nn.Linear LoRA layers; this adapter is fan_in_fan_out (Conv1D)")
    extra = sorted(k for k in plain.tensors if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if extra:
        raise RankwiseError(f"mlx-lm adapters hold LoRA A/B only; this run also saved {extra[0]} "
                            f"(and {len(extra) - 1} more): modules_to_save and trained biases cannot be exported")
    out = {}
    for prefix, (a, b, s) in lora_deltas(plain).items():
        name = prefix.removeprefix("base_model.model.")
        m = _LAYER.fullmatch(name)
        if m is None:
            raise RankwiseError(f"mlx-lm adapts modules inside model.layers.N only; this run adapts {name}")
        out[(int(m.group(1)), m.group(2))] = (a, b, s)
    if not out:
        raise RankwiseError("this run has no LoRA layers to export")
    return out


def _write_merged(deltas: dict, base: Path, config: dict, run_dir: Path, out: Path) -> None:
    """Base weights + s * B @ A (summed in float64, stored in the base's dtype) as one model.safetensors."""
    from safetensors.torch import load_file, save_file

    files = sorted(base.glob("model*.safetensors"))
    if not files:
        raise RankwiseError(f"--merge needs the base weights as model*.safetensors; {base} has none")
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    for (i, k), (a, b, s) in deltas.items():
        key = f"model.layers.{i}.{k}.weight"
        if key not in weights or tuple(weights[key].shape) != (b.shape[0], a.shape[1]):
            raise RankwiseError(f"{base} has no weight {key} of shape ({b.shape[0]}, {a.shape[1]}); "
                                "is it the model the run was trained on?")
        w = weights[key]
        weights[key] = (w.double() + s * (b.double() @ a.double())).to(w.dtype)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    _write_config_and_tokenizer(base, config, run_dir, out)


def _write_base(base: Path, config: dict, run_dir: Path, out: Path) -> None:
    """A copy of the base mlx-lm reads correctly; weights are hard links where the file system allows."""
    out.mkdir(parents=True)
    files = sorted(base.glob("model*.safetensors"))
    if not files:
        raise RankwiseError(f"--with-base needs the base weights as model*.safetensors; {base} has none")
    for f in files + sorted(base.glob("model*.safetensors.index.json")):
        try:
            os.link(f, out / f.name)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copy2(f, out / f.name)
    _write_config_and_tokenizer(base, config, run_dir, out)


def _write_config_and_tokenizer(base: Path, config: dict, run_dir: Path, out: Path) -> None:
    (out / "config.json").write_text(json.dumps(mlx_config(config), indent=2) + "\n")
    if (base / "generation_config.json").is_file():
        shutil.copy(base / "generation_config.json", out / "generation_config.json")
    for f in Path(run_dir).iterdir():  # the run's tokenizer (what training used), not necessarily the base's
        if f.name.startswith(_TOKENIZER_PREFIXES) or f.name == "chat_template.jinja":
            shutil.copy(f, out / f.name)
