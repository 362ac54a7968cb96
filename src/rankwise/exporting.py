"""EXPORT: any trained run folder -> a plain peft LoRA adapter (or another format), one command for every method.

    rankwise export RUN_DIR --out DIR                     # exact plain LoRA (multi-rank/AdaLoRA folded in)
    rankwise export RUN_DIR --out DIR --rank 8            # SVD-compressed to rank <= 8 per layer
    rankwise export RUN_DIR --out DIR --energy 0.99       # per layer, the fewest ranks keeping 99% of the energy
    rankwise export RUN_DIR --out DIR --format mlx        # mlx-lm adapter layout (writer registered by mlx_export)

The method that trained the run (task.json) turns it into a `PlainLora`; a format writer saves that. The exported
peft folder is itself a rankwise run folder (method lora), so eval/predict/merge accept it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from .methods import PlainLora, method_of_run
from .types import RankwiseError

__all__ = ["export", "compress_lora", "lora_deltas", "save_plain_lora", "register_format", "FORMATS"]

FORMATS: dict[str, Callable] = {}


def register_format(name: str):
    """Decorator: a writer `fn(plain: PlainLora, run_dir: Path, out: Path, **opts) -> None` for --format NAME."""

    def wrap(fn):
        FORMATS[name] = fn
        return fn

    return wrap


def lora_deltas(plain: PlainLora) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module prefix: (A (r, in), B (out, r), scaling)} of every LoRA layer, scaling as peft computes it."""
    cfg = plain.config
    out = {}
    for key, a in plain.tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        prefix = key[: -len(".lora_A.weight")]
        b = plain.tensors[prefix + ".lora_B.weight"]
        r = a.shape[0]
        alpha = _pattern_value(cfg.alpha_pattern, prefix, cfg.lora_alpha)
        scale = alpha / (r ** 0.5 if cfg.use_rslora else r)
        out[prefix] = (a, b, float(scale))
    return out


def _pattern_value(pattern: dict, prefix: str, default):
    """peft matches pattern keys as regexes against the module name; ours are fully qualified and escaped."""
    import re

    name = prefix.removeprefix("base_model.model.")
    for key, v in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return v
    return default


def compress_lora(plain: PlainLora, *, rank: int | None = None, energy: float | None = None) -> PlainLora:
    """SVD of each layer's scaled delta B A, truncated to `rank` or to the fewest components keeping `energy` of
    the squared singular values. Written with alpha = rank, so peft's scaling is 1 and the singular values sit in B.
    Layers whose delta is exactly zero are left out."""
    if (rank is None) == (energy is None):
        raise RankwiseError("give exactly one of --rank K or --energy E to compress")
    if rank is not None and rank < 1:
        raise RankwiseError(f"--rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise RankwiseError(f"--energy must be in (0, 1], got {energy}")
    tensors = {k: v for k, v in plain.tensors.items() if ".lora_A." not in k and ".lora_B." not in k}
    ranks = {}
    for prefix, (a, b, scale) in lora_deltas(plain).items():
        delta = (b.double() * scale) @ a.double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        if rank is not None:
            k = min(rank, int((s > s[0] * 1e-12).sum()) if s.numel() and s[0] > 0 else 0)
        else:
            cum = torch.cumsum(s ** 2, 0) / (s ** 2).sum().clamp_min(1e-300)
            k = int((cum < energy - 1e-12).sum()) + 1 if s.numel() and s[0] > 0 else 0
        if k == 0:
            continue
        tensors[prefix + ".lora_A.weight"] = vh[:k].to(a.dtype).contiguous()
        tensors[prefix + ".lora_B.weight"] = (u[:, :k] * s[:k]).to(b.dtype).contiguous()
        ranks[prefix.removeprefix("base_model.model.")] = k
    return PlainLora(_config_with_ranks(plain.config, ranks), tensors)


def _config_with_ranks(config, ranks: dict[str, int]):
    """A LoraConfig adapting exactly `ranks` (fully qualified names), alpha = rank (scaling 1)."""
    from collections import Counter

    from peft import LoraConfig

    from .targets import peft_patterns

    if not ranks:
        raise RankwiseError("every layer's update is zero: nothing to export")
    d = config.to_dict()
    for k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
              "peft_type", "auto_mapping", "revision"):
        d.pop(k, None)
    d = {k: v for k, v in d.items() if k in LoraConfig.__dataclass_fields__}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    return LoraConfig(r=r0, lora_alpha=r0, target_modules=sorted(ranks), rank_pattern=peft_patterns(ranks),
                      alpha_pattern=peft_patterns({n: float(r) for n, r in ranks.items()}), use_rslora=False, **d)


def plain_from_deltas(config, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]], extra: dict) -> PlainLora:
    """Build a PlainLora from {module name: (A (r, in), B (out, r))} with scaling folded into B (alpha = r).
    Methods use this for their exact export; `extra` carries modules_to_save tensors unchanged."""
    tensors = dict(extra)
    ranks = {}
    for name, (a, b) in deltas.items():
        if a.shape[0] == 0:
            continue  # pruned to rank 0: left out of the targets
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        ranks[name] = int(a.shape[0])
    return PlainLora(_config_with_ranks(config, ranks), tensors)


@register_format("peft")
def save_plain_lora(plain: PlainLora, run_dir: Path, out: Path, **_) -> None:
    """adapter_config.json + adapter_model.safetensors, plus the run's tokenizer/task.json so rankwise eval,
    predict and merge accept the folder (as a plain lora run)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    plain.config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in plain.tensors.items()}, str(out / "adapter_model.safetensors"))
    _copy_run_files(run_dir, out)


def _copy_run_files(run_dir: Path, out: Path) -> None:
    for f in Path(run_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or f.name == "chat_template.jinja":
            shutil.copy(f, out / f.name)
    task = json.loads((Path(run_dir) / "task.json").read_text())
    task["method"] = "lora"
    task["exported_from"] = {"run": str(Path(run_dir).resolve()), "method": method_of_run(run_dir).name}
    (out / "task.json").write_text(json.dumps(task, indent=2) + "\n")


@register_format("merged")
def save_merged(plain: PlainLora, run_dir: Path, out: Path, **_) -> None:
    """The base model with the adapter folded in (`merge_and_unload`): a plain transformers folder."""
    from peft import PeftModel

    from .training.runs import _base_path, check_run_base, load_run
    from .training.data import DataInfo
    from .training.tasks import load_model

    task_info = load_run(run_dir)
    base = load_model(_base_path(task_info), task_info["task"], DataInfo.from_dict(task_info["data"]))
    check_run_base(base, run_dir)  # the base folder still holds the model the run was trained on
    scratch = out.parent / f".{out.name}.lora-{os.getpid()}"
    try:
        save_plain_lora(plain, Path(run_dir), scratch)
        merged = PeftModel.from_pretrained(base, str(scratch)).merge_and_unload()
        merged.save_pretrained(str(out))
        _copy_run_files(run_dir, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, format: str = "peft", rank: int | None = None,
           energy: float | None = None, overwrite: bool = False, progress: bool = True, **opts) -> Path:
    """Write the run at `run_dir` as `format` to `out` (atomically: a sibling temp folder, renamed into place)."""
    _load_writers()
    if format not in FORMATS:
        raise RankwiseError(f"unknown export format {format!r}; choose one of: {', '.join(sorted(FORMATS))}")
    from .outputs import atomic_dir, check_out, mark

    run_dir, out = Path(run_dir), Path(out)
    method = method_of_run(run_dir)
    if out.resolve() == run_dir.resolve():
        raise RankwiseError("--out must differ from the run folder")
    check_out(out, overwrite, protected=[run_dir])  # never cwd, an ancestor, the run, or a folder of the user's
    plain = method.to_lora(run_dir, rank=rank, energy=energy)
    with atomic_dir(out) as tmp:
        FORMATS[format](plain, run_dir, tmp, **opts)
        mark(tmp, "export")  # mlx folders have no task.json: --overwrite recognises them by this marker
    if progress:
        import sys

        print(f"wrote {out} ({format}, from a {method.name} run)", file=sys.stderr)
        if json.loads((run_dir / "task.json").read_text()).get("pair_encoding") == "separate":
            print("note: this run encodes sentence pairs separately; rankwise eval/predict apply that, but plain "
                  "peft/transformers need rankwise.training.pairs.separate_pairs(model) on the base model first "
                  "(docs/train.md)", file=sys.stderr)
    return out


def _load_writers() -> None:
    """Optional writers register themselves on import (mlx lives in its own module)."""
    import importlib

    try:
        importlib.import_module("rankwise.mlx_export")
    except ModuleNotFoundError as e:
        if e.name != "rankwise.mlx_export":
            raise
