"""EXPORT: any trained run folder -> a plain peft LoRA adapter (or another format), one command for every method.

    rankwise export RUN_DIR --out DIR                     # exact plain LoRA (multi-rank/AdaLoRA folded in)
    rankwise export RUN_DIR --out DIR --rank 8            # SVD-compressed to rank <= 8 per layer
    rankwise export RUN_DIR --out DIR --energy 0.99       # per layer, the fewest ranks keeping 99% of the energy
    rankwise export RUN_DIR --out DIR --format mlx        # mlx-lm adapter layout (writer in mlx_export.py)

The method that trained the run (task.json) turns it into a `PlainLora`; a format writer saves that. The exported
peft folder is itself a rankwise run folder (method lora), so eval/predict/merge accept it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from .methods import PlainLora, method_of_run
from .methods.plain import compress_lora, lora_deltas, plain_from_deltas  # re-exported: public since export's start
from .types import RankwiseError

__all__ = ["export", "compress_lora", "lora_deltas", "plain_from_deltas", "save_plain_lora", "register_format",
           "FORMATS"]

FORMATS: dict[str, Callable] = {}


def register_format(name: str):
    """Decorator: a writer `fn(plain: PlainLora, run_dir: Path, out: Path, **opts) -> None` for --format NAME."""

    def wrap(fn):
        FORMATS[name] = fn
        return fn

    return wrap


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
    """The mlx writer lives in its own module, registered here on first use (it does not import this module, so
    the two never import each other)."""
    if "mlx" not in FORMATS:
        from .mlx_export import save_mlx

        register_format("mlx")(save_mlx)
