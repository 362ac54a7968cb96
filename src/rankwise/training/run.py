"""`train()`: data -> task head -> plan -> peft LoRA -> Trainer -> a run folder written atomically.

The run folder is a plain peft adapter (loads with `PeftModel.from_pretrained(base, DIR)`, no rankwise import)
plus plan.json, the tokenizer, task.json (label map, columns, base model) and results.json.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import resource
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ..types import RankwiseError
from .prepare import (
    add_labels,
    clean_metrics,
    default_max_length,
    encode,
    make_trainer,
    pick_device,
    quiet_libraries,
    read_data,
    resolve_model_path,
    say,
)
from .tasks import TruncationNotice, infer_task, load_model, load_tokenizer

__all__ = ["RESULTS_SCHEMA", "DEFAULT_LR", "train", "train_model", "versions", "peak_memory", "default_out"]

RESULTS_SCHEMA = 1
# 2e-3 for classification heads: MiniLM + SST-2 (3k samples, 1 epoch) measured 0.78 at 5e-4, 0.82 at 2e-3.
DEFAULT_LR = {"seq-cls": 2e-3, "causal-lm": 2e-4}
_HEAD_MODULES = ("classifier", "score")  # new task heads: trained in full and saved with the adapter


def versions() -> dict:
    import datasets
    import peft
    import torch
    import transformers

    from .. import __version__

    return {"rankwise": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "datasets": datasets.__version__, "python": platform.python_version()}


def peak_memory(device: str) -> int:
    """Peak bytes: CUDA allocated on GPU, process RSS on CPU (Linux reports ru_maxrss in KiB)."""
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def default_out(model: str, task: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(str(model)).name}-{task}-{stamp}"


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RankwiseError(f"output {out} already exists; choose another --out or pass --overwrite")


def _finish(tmp: Path, out: Path) -> None:
    """Replace `out` with the finished temp folder, so a crash never leaves a half-written run."""
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)


def _head_modules(model) -> list[str]:
    """The task head, trained in full: the new classifier, plus BERT's pooler, which feeds it.

    The pooler is part of BERT's classification head (CLS -> dense -> tanh -> classifier). Encoders tuned for
    mean pooling (sentence-transformers such as MiniLM) ship it untrained (zero bias, tiny weights): frozen, it
    squeezes the head's input and its gradient, and STS-B regression stalls near the mean."""
    top = {n for n, _ in model.named_children()}
    heads = [h for h in _HEAD_MODULES if h in top]
    if heads and any(n.endswith(".pooler") and n.count(".") == 1 for n, _ in model.named_modules()):
        heads.append("pooler")
    return heads


def _loss_curve(log_history: list[dict]) -> list[dict]:
    return [{"step": int(h["step"]), "loss": float(h["loss"])} for h in log_history if "loss" in h and "step" in h]


def _lora_kwargs(task: str, model, model_path: str, lora_dropout: float) -> dict:
    # base_model_name_or_path: the folder actually loaded, so the adapter config names a loadable base
    kw = {"lora_dropout": lora_dropout, "base_model_name_or_path": model_path,
          "task_type": "SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM"}
    if task == "seq-cls":
        kw["modules_to_save"] = _head_modules(model)
    return kw


def train(model: str | os.PathLike, data: str | os.PathLike, **kwargs) -> dict:
    """Train a LoRA adapter and write the run folder; returns the results dict (also in results.json).

    Adapter choice (one of): `plan` (Plan or folder), `strategy` + `budget`/`budget_rank`, `preset`
    (efficient | balanced | expressive; the default is balanced), or `rank` (+ `targets`). Keyword arguments
    are those of `train_model` (and of the `rankwise train` flags)."""
    return train_model(model, data, **kwargs)[0]


def train_model(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    task: str = "auto",
    out: str | os.PathLike | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    validation_split: float = 0.1,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_length: int | None = None,
    plan=None,
    strategy: str | None = None,
    budget=None,
    budget_rank: int | None = None,
    preset: str | None = None,
    rank: int | None = None,
    targets: str | Sequence[str] | None = None,
    strategy_options: dict | None = None,
    method: str = "lora",
    method_options: dict | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    dora: bool = False,
    rslora: bool = False,
    epochs: float = 1.0,
    lr: float | None = None,
    batch_size: int = 16,
    max_steps: int | None = None,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> tuple[dict, object]:
    """`train`, also returning the trained PeftModel (in memory, eval mode) for callers that keep using it."""
    if batch_size < 1 or epochs <= 0:
        raise RankwiseError(f"--batch-size must be >= 1 and --epochs > 0, got {batch_size} and {epochs}")
    from ..methods import MethodContext, get_method

    the_method = get_method(method)
    choice = dict(plan=plan, strategy=strategy, budget=budget, budget_rank=budget_rank, preset=preset, rank=rank,
                  targets=targets)
    the_method.check(dict(method_options or {}), {**choice, "strategy_options": strategy_options})
    with quiet_libraries(progress):
        # 1. everything that can fail on bad input, before any minute is spent training
        model_path = resolve_model_path(model)
        dev = pick_device(device)
        out = Path(out) if out is not None else default_out(model, task)
        _check_out(out, overwrite)
        s = _prepare(model_path, data, task, text_columns, label_column, validation_split, max_train_samples,
                     max_eval_samples, max_length, seed)
        # 2. the model with its head and the planned LoRA layers (seeded: the head and LoRA A are random)
        from transformers import set_seed

        set_seed(seed)
        base = load_model(model_path, s["task"], s["info"])
        ctx = MethodContext(
            task=s["task"], model_name=str(model), model_path=model_path,
            lora_kwargs=_lora_kwargs(s["task"], base, model_path, lora_dropout),
            choice={**choice, "strategy_options": strategy_options, "lora_alpha": lora_alpha, "dora": dora,
                    "rslora": rslora},
            options=dict(method_options or {}), progress=progress, seed=seed, train_dataset=s["train"],
            collate=s["collate"])
        built = the_method.build(base, ctx)
        peft_model, the_plan, adapter = built.model, built.plan, {"method": method, **built.info}
        # 3. train and evaluate inside a temp folder beside `out`, then rename it into place
        hparams = dict(epochs=epochs, lr=lr if lr is not None else DEFAULT_LR[s["task"]], batch_size=batch_size,
                       max_steps=max_steps, max_length=s["length"], lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                       dora=dora, rslora=rslora, max_train_samples=max_train_samples,
                       max_eval_samples=max_eval_samples)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            evaluation, train_info, method_info = _fit(the_method, built, ctx, s, hparams, seed, dev, progress, tmp)
            results = {
                "schema": RESULTS_SCHEMA,
                "run_info": _run_info(model, model_path, s["task"], data, s["info"], adapter, the_plan, seed, dev,
                                      command, hparams, out),
                "train_info": train_info,
                "eval": evaluation,
            }
            if method_info:
                results["method_info"] = method_info
            _save(tmp, the_method, built, s["tokenizer"], results, model, model_path, s["task"], s["info"],
                  s["length"])
            _finish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {out}", progress)
    return results, peft_model.eval()


# help(train) and IDEs show every keyword argument, not **kwargs
train.__signature__ = inspect.signature(train_model).replace(return_annotation="dict")


def _prepare(model_path, data, task, text_columns, label_column, validation_split, max_train_samples,
             max_eval_samples, max_length, seed) -> dict:
    """Read the data, decide the task and labels, and tokenize both splits."""
    from transformers import AutoConfig

    prepared = read_data(data, text_columns=text_columns, label_column=label_column,
                         validation_split=validation_split, seed=seed)
    info = prepared.info
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise RankwiseError(f"could not load model {model_path}: {str(e).splitlines()[0][:200]}") from None
    task = infer_task(task, info.kind, info.label_column is not None, config)
    if task == "seq-cls":
        if info.kind != "table":
            raise RankwiseError("--task seq-cls needs a table with a label column, not plain text/instructions")
        add_labels(prepared)
    tokenizer = load_tokenizer(model_path)
    length = default_max_length(tokenizer, config, max_length)
    notice = TruncationNotice(length)
    train_ds = encode(prepared.splits["train"], task, info, tokenizer, length, max_train_samples, seed, notice)
    eval_ds = encode(prepared.splits["validation"], task, info, tokenizer, length, max_eval_samples, seed)
    from .tasks import collator

    return {"task": task, "info": info, "tokenizer": tokenizer, "length": length, "train": train_ds,
            "eval": eval_ds, "collate": collator(task, tokenizer)}


def _fit(method, built, ctx, s: dict, hp: dict, seed: int, dev: str, progress: bool,
         tmp: Path) -> tuple[dict, dict, dict]:
    """Trainer.train between two evaluations (causal LM: before and after). Returns (eval, train_info, method_info)."""
    peft_model = built.model
    task, train_ds, eval_ds = s["task"], s["train"], s["eval"]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    where = f" in {len(built.plan.adapted)} layers" if built.plan is not None else ""
    say(f"training {trainable:,} of {total:,} parameters ({built.lora_params:,} {method.name}{where}) "
        f"on {len(train_ds):,} examples, {dev}", progress)
    planned = hp["max_steps"] or math.ceil(math.ceil(len(train_ds) / hp["batch_size"]) * hp["epochs"])
    trainer = make_trainer(peft_model, s["tokenizer"], task, s["info"].label_type, out_dir=str(tmp / "trainer"),
                           train_ds=train_ds, eval_ds=eval_ds, lr=hp["lr"], epochs=hp["epochs"],
                           batch_size=hp["batch_size"], max_steps=hp["max_steps"], seed=seed, device=dev,
                           progress=progress, logging_steps=max(1, planned // 25))
    ctx.total_steps = planned
    for cb in method.callbacks(built, ctx):
        trainer.add_callback(cb)
    if dev == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    evaluation = {"split": "validation", "num_samples": len(eval_ds)}
    if task == "causal-lm":  # the "does training help" baseline: the same eval before any step
        before = trainer.evaluate()
        evaluation["eval_loss_before"] = float(before["eval_loss"])
        evaluation["perplexity_before"] = _ppl(before["eval_loss"])
    start = time.perf_counter()
    state = trainer.train()
    wall = time.perf_counter() - start
    metrics = clean_metrics(trainer.evaluate())
    if task == "causal-lm":
        metrics["perplexity"] = _ppl(metrics["eval_loss"])
    evaluation.update(metrics)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    method_info = method.finish(built, ctx, tmp)  # raises when the method silently degraded
    train_info = {
        "trainable_params": trainable, "total_params": total, "lora_params": built.lora_params,
        "train_samples": len(train_ds), "steps": int(state.global_step), "epochs": hp["epochs"],
        "train_loss": float(state.training_loss), "wall_time_s": round(wall, 3),
        "peak_memory_bytes": peak_memory(dev), "loss_curve": _loss_curve(trainer.state.log_history),
    }
    return evaluation, train_info, method_info


def _ppl(loss: float) -> float:
    from .metrics import perplexity

    return perplexity(float(loss))


def _run_info(model, model_path, task, data, info, adapter, plan, seed, dev, command, hparams, out) -> dict:
    return {
        "model": str(model), "model_path": str(model_path), "task": task, "data": str(data),
        "data_info": info.to_dict(), "out": str(out),
        "adapter": {**adapter, **({"budget": plan.budget.to_dict(), "spent": plan.spent,
                                   "layers_adapted": len(plan.adapted)} if plan is not None else {})},
        "method": adapter.get("method", "lora"),
        "strategy": plan.strategy if plan is not None else adapter.get("strategy"), "preset": adapter.get("preset"),
        "budget": plan.budget.to_dict() if plan is not None else adapter.get("budget"),
        "hparams": hparams, "seed": seed, "device": dev, "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
    }


def _save(tmp: Path, method, built, tokenizer, results, model, model_path, task, info, length) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    method.save(built, tmp)
    tokenizer.save_pretrained(str(tmp))
    if built.plan is not None:  # not plan.save: the method already wrote the run's adapter config
        built.plan.write_json(tmp / "plan.json")
    task_info = {"schema": 1, "task": task, "method": method.name, "base_model": str(model), "base_model_path": str(model_path),
                 "max_length": length, "prompt_template": "alpaca" if info.kind == "instruction" else None,
                 "data": info.to_dict()}
    (tmp / "task.json").write_text(json.dumps(task_info, indent=2) + "\n")
    (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
