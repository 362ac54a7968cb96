"""Checkpoints that outlive a killed run, and `--resume` that continues it.

`--save-steps N` makes Trainer write `checkpoint-N/` folders into `.<out>.checkpoints/`, a hidden sibling of the
run folder: not the `.partial-*` temp folder (which is removed on exit), so a SIGKILL or power loss leaves them in
place. The folder also holds `rankwise-run.json`, the settings that decide the result (model, data, seed,
hyperparameters, adapter choice); `--resume` refuses checkpoints made with other settings, finds the last complete
checkpoint and hands it to `Trainer.train(resume_from_checkpoint=...)`, which restores the adapter, optimizer,
scheduler, RNG states and data position. After a successful run the folder is removed.

Checkpoints are Trainer's own format (optimizer and RNG state are torch pickles): transient files of this
machine's run, never a rankwise artefact (the run folder holds safetensors and JSON only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..types import RankwiseError

__all__ = ["MARKER", "checkpoint_dir", "last_checkpoint", "fingerprint", "open_checkpoints", "close_checkpoints",
           "run_settings", "start_checkpoints", "process_dir", "keep_tracker_logs", "curve_loss", "eval_curve", "lr_curve", "step_of"]

MARKER = "rankwise-run.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Settings that change nothing in the trained weights: a resumed run may change them.
_FREE = {"save_steps", "save_total_limit", "eval_steps", "report_to", "max_eval_samples", "device"}


def checkpoint_dir(out: Path) -> Path:
    return Path(out).parent / f".{Path(out).name}.checkpoints"


def last_checkpoint(folder: Path) -> Path | None:
    """The highest-step `checkpoint-N` whose trainer_state.json (written last by Trainer) is complete."""
    if not folder.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name))),
                   reverse=True)
    for _, p in found:
        try:
            json.loads((p / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue  # killed while this checkpoint was being written
        return p
    return None


def fingerprint(**settings) -> dict:
    """The settings a checkpoint is valid for, as JSON-comparable values."""
    return json.loads(json.dumps(settings, default=str, sort_keys=True))


def _differences(saved: dict, now: dict) -> list[str]:
    keys = sorted((set(saved) | set(now)) - _FREE)
    return [f"{k}={saved.get(k)!r} then, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]


def open_checkpoints(out: Path, settings: dict, *, resume: bool, overwrite: bool, main: bool = True) -> Path | None:
    """Check (and on the main process, prepare) the checkpoint folder of `out`; the checkpoint to resume from.

    Fresh run: an earlier run's checkpoints are refused (they would be silently lost) unless --overwrite.
    --resume: the settings must match the saved ones, and there must be a complete checkpoint."""
    folder = checkpoint_dir(out)
    marker = folder / MARKER
    if not main:  # other processes of a data-parallel launch only read; the main process decided
        return last_checkpoint(folder) if resume else None
    if resume:
        if not marker.is_file():
            raise RankwiseError(f"--resume: no checkpoints of an earlier run in {folder} (was it run with "
                                "--save-steps and the same --out?); run again without --resume")
        try:
            saved = json.loads(marker.read_text())
        except ValueError:
            raise RankwiseError(f"--resume: {marker} is corrupt; start over with --overwrite") from None
        diff = _differences(saved, settings)
        if diff:
            raise RankwiseError(f"--resume: the checkpoints in {folder} were made with other settings "
                                f"({'; '.join(diff[:3])}); resume with the same flags, or start over with --overwrite")
        last = last_checkpoint(folder)
        if last is None:
            raise RankwiseError(f"--resume: {folder} holds no complete checkpoint yet (killed before the first "
                                "--save-steps step); run again without --resume")
        return last
    if folder.exists() and any(folder.iterdir()):
        if not marker.is_file():
            raise RankwiseError(f"{folder} exists and was not written by rankwise; move it away")
        if not overwrite and last_checkpoint(folder) is not None:  # killed before its first checkpoint: nothing lost
            raise RankwiseError(f"{folder} holds checkpoints of an interrupted run of {out}: pass --resume to "
                                "continue it, or --overwrite to start over")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MARKER}.{os.getpid()}"
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    tmp.replace(marker)  # atomic: a kill never leaves a half-written marker
    return None


def close_checkpoints(out: Path) -> None:
    """After a successful run the checkpoints are spent: remove the folder (only one carrying rankwise's marker)."""
    folder = checkpoint_dir(out)
    if (folder / MARKER).is_file():
        shutil.rmtree(folder, ignore_errors=True)


# Arguments of train_model that are no setting of the result (where it goes, how it talks, what to do first).
_NOT_SETTINGS = {"out", "overwrite", "progress", "command", "resume", "device"}


def run_settings(params: dict) -> dict:
    """train_model's arguments (its locals() on entry) as the fingerprint a checkpoint must match on --resume."""
    from .options import world_size

    return fingerprint(**{k: v for k, v in params.items() if k not in _NOT_SETTINGS}, world_size=world_size())


def start_checkpoints(out: Path, settings: dict, opts, method, *, resume: bool, overwrite: bool) -> Path | None:
    """Before any model loads: the checkpoint to resume from (None: a fresh start), with the folder prepared when
    this run writes checkpoints. A resumed run keeps checkpointing as the killed one did."""
    from .options import is_main_process

    if resume and not getattr(method, "resumable", method.name == "lora"):
        raise RankwiseError(f"--resume works with --method lora; method {method.name!r} keeps training state "
                            "outside Trainer's checkpoints")
    if resume and opts.save_steps is None:
        try:
            saved = json.loads((checkpoint_dir(out) / MARKER).read_text())
        except (OSError, ValueError):
            saved = {}
        opts.save_steps, opts.save_total_limit = saved.get("save_steps"), saved.get("save_total_limit")
    if not (resume or opts.save_steps):
        return None
    return open_checkpoints(out, settings, resume=resume, overwrite=overwrite, main=is_main_process())


@contextmanager
def process_dir(out: Path):
    """Where this process writes its run: the atomic temp folder of `out` on the main process; on the other
    processes of a data-parallel launch a private scratch folder that vanishes (one run folder, from rank 0)."""
    from ..outputs import atomic_dir
    from .options import is_main_process

    if is_main_process():
        with atomic_dir(out) as tmp:
            yield tmp
    else:
        with tempfile.TemporaryDirectory(prefix="rankwise-rank-") as d:
            yield Path(d)


def keep_tracker_logs(trainer_dir: Path, run_dir: Path) -> None:
    """TensorBoard writes under <Trainer output_dir>/runs/; the run folder keeps them as logs/."""
    from .options import is_main_process

    src = Path(trainer_dir) / "runs"
    if is_main_process() and src.is_dir():
        shutil.move(str(src), str(Path(run_dir) / "logs"))


def curve_loss(curve: list[dict], fallback: float) -> float:
    """The mean training loss over every step, from the loss curve (each point averages the steps since the one
    before). Trainer's own train_loss counts only the steps of this process, not those before a resume."""
    total, last = 0.0, 0
    for point in curve:
        total += point["loss"] * (point["step"] - last)
        last = point["step"]
    return total / last if last else float(fallback)


def eval_curve(log_history: list[dict]) -> list[dict]:
    """--eval-steps evaluations during training, in step order (timing noise dropped)."""
    drop = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    return [{"step": int(h["step"]), **{k: float(v) for k, v in h.items()
                                        if k.startswith("eval_") and not k.endswith(drop)}}
            for h in log_history if "eval_loss" in h and "step" in h]


def step_of(checkpoint: Path | None) -> int | None:
    """The optimizer step of a `checkpoint-N` folder (None: not resumed)."""
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint is not None else None


def lr_curve(log_history: list[dict]) -> list[dict]:
    """The learning rate each logged optimizer step used (Trainer logs it before the scheduler moves on)."""
    return [{"step": int(h["step"]), "lr": float(h["learning_rate"])} for h in log_history
            if "learning_rate" in h and "loss" in h and "step" in h]
