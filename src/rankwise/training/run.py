"""`train()`: data -> task head -> plan -> peft LoRA -> Trainer -> a run folder written atomically.

The run folder is a plain peft adapter (loads with `PeftModel.from_pretrained(base, DIR)`, no rankwise import)
plus plan.json, the tokenizer, task.json (label map, columns, base model) and results.json.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence

from ..outputs import check_out
from ..types import RankwiseError
from .holdout import check_eval_on
from .prepare import (
    add_labels,
    clean_metrics,
    decide_task,
    default_max_length,
    encode,
    make_trainer,
    pick_device,
    quiet_libraries,
    read_data,
    resolve_model_path,
    say,
)
from .quantize import count_params, head_modules, model_memory, outer_heads, run_quantization
from .guards import check_finite_weights, run_warnings
from .tasks import TruncationNotice, load_model, load_tokenizer
from .checkpoints import (
    close_checkpoints,
    curve_loss,
    eval_curve,
    keep_tracker_logs,
    lr_curve,
    process_dir,
    run_settings,
    start_checkpoints,
    step_of,
)
from .options import TrainOptions, is_main_process, world_size
from .record import current_rss, loss_curve, peak_memory, perplexity_of, run_info, versions

__all__ = ["RESULTS_SCHEMA", "DEFAULT_LR", "train", "train_model", "versions", "peak_memory", "default_out"]

RESULTS_SCHEMA = 1
# 2e-3 for classification heads: MiniLM + SST-2 (3k samples, 1 epoch) measured 0.78 at 5e-4, 0.82 at 2e-3.
DEFAULT_LR = {"seq-cls": 2e-3, "causal-lm": 2e-4}


def default_out(model: str, task: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(str(model)).name}-{task}-{stamp}"


def _check_numbers(**values) -> None:
    """Every numeric argument finite and in range, before any data is read or model loaded (API and CLI alike)."""
    from ..parsing import check_number

    rules = {"epochs": dict(lo=0, lo_open=True), "lr": dict(lo=0, lo_open=True),
             "batch_size": dict(lo=1, integer=True), "max_steps": dict(lo=1, integer=True),
             "lora_alpha": dict(lo=0, lo_open=True), "lora_dropout": dict(lo=0, hi=1, hi_open=True),
             "validation_split": dict(lo=0, hi=1, lo_open=True, hi_open=True),
             "max_train_samples": dict(lo=1, integer=True), "max_eval_samples": dict(lo=1, integer=True),
             "max_length": dict(lo=8, integer=True), "seed": dict(lo=0, hi=2**32 - 1, integer=True),
             "budget_rank": dict(lo=1, integer=True), "rank": dict(lo=1, integer=True),
             "dev_samples": dict(lo=1, integer=True), "dev_seed": dict(lo=0, hi=2**32 - 1, integer=True)}
    for name, value in values.items():
        check_number(f"--{name.replace('_', '-')}", value, **rules[name])


def _absolute(model_path: str) -> str:
    """A local model folder as an absolute path, so a run folder names its base wherever it is used from."""
    p = Path(model_path)
    return str(p.resolve()) if p.exists() else model_path


def _lora_kwargs(task: str, model, model_path: str, lora_dropout: float) -> dict:
    # base_model_name_or_path: the folder actually loaded, so the adapter config names a loadable base
    kw = {"lora_dropout": lora_dropout, "base_model_name_or_path": model_path,
          "task_type": "SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM"}
    if task == "seq-cls":
        # the new head is trained in full, and so is BERT's pooler, which feeds it: encoders tuned for mean
        # pooling (sentence-transformers such as MiniLM) ship it untrained, and frozen it stalls STS-B regression
        kw["modules_to_save"] = head_modules(model)
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
    calib_samples: int | None = None,
    method: str = "lora",
    method_options: dict | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    dora: bool = False,
    rslora: bool = False,
    quantize: str | None = None,
    quant_type: str | None = None,
    double_quant: bool = False,
    compute_dtype: str | None = None,
    epochs: float = 1.0,
    lr: float | None = None,
    batch_size: int = 16,
    max_steps: int | None = None,
    grad_accum: int = 1,
    warmup_ratio: float = 0.06,
    weight_decay: float = 0.0,
    scheduler: str = "linear",
    bf16: bool = False,
    fp16: bool = False,
    save_steps: int | None = None,
    save_total_limit: int | None = None,
    eval_steps: int | None = None,
    report_to: str | Sequence[str] | None = None,
    train_args: dict | Sequence[str] | None = None,
    resume: bool = False,
    label_names: Sequence[str] | None = None,
    drop_empty: bool = False,
    pair_encoding: str = "joint",
    dev_samples: int | None = None,
    dev_seed: int = 0,
    eval_on: str = "validation",
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> tuple[dict, object]:
    """`train`, also returning the trained PeftModel (in memory, eval mode) for callers that keep using it."""
    settings = run_settings(locals())  # first: exactly the arguments, the fingerprint --resume checks
    _check_numbers(epochs=epochs, lr=lr, batch_size=batch_size, max_steps=max_steps, lora_alpha=lora_alpha,
                   lora_dropout=lora_dropout, validation_split=validation_split, max_train_samples=max_train_samples,
                   max_eval_samples=max_eval_samples, max_length=max_length, seed=seed, budget_rank=budget_rank,
                   rank=rank, dev_samples=dev_samples, dev_seed=dev_seed)
    check_eval_on(eval_on, dev_samples)
    from ..methods import MethodContext, get_method
    from .pairs import check_pair_encoding, separate_pairs

    check_pair_encoding(pair_encoding)

    the_method = get_method(method)
    choice = dict(plan=plan, strategy=strategy, budget=budget, budget_rank=budget_rank, preset=preset, rank=rank,
                  targets=targets)
    the_method.check(dict(method_options or {}), {**choice, "strategy_options": strategy_options})
    quant = run_quantization(the_method, preset, quantize, quant_type, double_quant, compute_dtype)
    with quiet_libraries(progress):
        # 1. everything that can fail on bad input, before any minute is spent training
        model_path = _absolute(resolve_model_path(model))
        dev = pick_device(device)
        opts = TrainOptions(grad_accum, warmup_ratio, weight_decay, scheduler, bf16, fp16, save_steps,
                            save_total_limit, eval_steps, report_to, train_args or {}).check(dev)
        out = Path(out) if out is not None else default_out(model, task)
        # never cwd, an ancestor, or one of the run's inputs (rankwise.outputs.check_out)
        check_out(out, overwrite, protected=[model_path, data, plan if isinstance(plan, (str, os.PathLike)) else None])
        resume_from = start_checkpoints(out, settings, opts, the_method, resume=resume, overwrite=overwrite)
        s = _prepare(model_path, data, task, text_columns, label_column, validation_split, max_train_samples,
                     max_eval_samples, max_length, seed, label_names, drop_empty, pair_encoding,
                     (dev_samples, dev_seed, eval_on))
        # 2. the model with its head and the planned LoRA layers (seeded: the head and LoRA A are random)
        from transformers import set_seed

        set_seed(seed)
        s["rss_start"] = current_rss()  # before the weights: peak_memory_increase_bytes is what the run took
        base = load_model(model_path, s["task"], s["info"], quantization=quant, device=dev)
        check_finite_weights(base, f"model {model_path}")
        if pair_encoding == "separate":  # before the method builds: calibration and training see the same forward
            from .pairs import fit_head

            separate_pairs(base)
            say(f"fitted the pair head on the untouched cosines: {fit_head(base, s['train'], s['collate'])}",
                progress)
        if quant is not None:
            from .quantize import prepare

            base = prepare(base)
        ctx = MethodContext(
            task=s["task"], model_name=str(model), model_path=model_path,
            lora_kwargs=_lora_kwargs(s["task"], base, model_path, lora_dropout),
            choice={**choice, "strategy_options": strategy_options, "calib_samples": calib_samples,
                    "lora_alpha": lora_alpha, "dora": dora,
                    "rslora": rslora},
            options=dict(method_options or {}), progress=progress, seed=seed, train_dataset=s["train"],
            collate=s["collate"], data=str(data), plan_source=model_path if quant is not None else None)
        # the seq-cls heads the base checkpoint lacks: saved in the adapter (modules_to_save), restored on load
        restored = outer_heads(base) if s["task"] == "seq-cls" else []
        built = the_method.build(base, ctx)
        peft_model, the_plan, adapter = built.model, built.plan, {"method": method, **built.info}
        # 3. train and evaluate inside a temp folder beside `out`, then rename it into place
        hparams = dict(epochs=epochs, lr=lr if lr is not None else DEFAULT_LR[s["task"]], batch_size=batch_size,
                       max_steps=max_steps, max_length=s["length"], lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                       dora=dora, rslora=rslora, max_train_samples=max_train_samples,
                       max_eval_samples=max_eval_samples, **opts.to_dict(), label_names=label_names,
                       drop_empty=drop_empty, pair_encoding=pair_encoding, dev_samples=dev_samples,
                       dev_seed=dev_seed, eval_on=eval_on)
        # the main process only (rank 0 under torchrun): removed on any failure, SIGTERM included; renamed onto
        # `out` on success
        with process_dir(out) as tmp:
            evaluation, train_info, method_info = _fit(the_method, built, ctx, s, hparams, seed, dev, progress, tmp,
                                                       opts=opts, resume_from=resume_from, out=out)
            results = {
                "schema": RESULTS_SCHEMA,
                "run_info": run_info(model, model_path, s["task"], data, s["info"], adapter, the_plan, seed, dev,
                                      command, hparams, out),
                "train_info": train_info,
                "eval": evaluation,
            }
            results["run_info"]["quantization"] = quant.to_dict() if quant is not None else None
            if method_info:
                results["method_info"] = method_info
            results["warnings"] = run_warnings(s["task"], s["info"], evaluation, train_info.get("train_loss"))
            _save(tmp, the_method, built, s["tokenizer"], results, model, model_path, s["task"], s["info"],
                  s["length"], restored, pair_encoding)
    if not is_main_process():
        return results, peft_model.eval()
    close_checkpoints(out)  # the run folder is in place: its checkpoints are spent
    for line in results["warnings"]:
        print(f"warning: {line}", file=sys.stderr)  # shown even with -q: a run that learned nothing must say so
    say(f"wrote {out}", progress)
    return results, peft_model.eval()


# help(train) and IDEs show every keyword argument, not **kwargs
train.__signature__ = inspect.signature(train_model).replace(return_annotation="dict")


def _prepare(model_path, data, task, text_columns, label_column, validation_split, max_train_samples,
             max_eval_samples, max_length, seed, label_names=None, drop_empty=False, pair_encoding="joint",
             dev=(None, 0, "validation")) -> dict:
    """Read the data, decide the task and labels, and tokenize both splits."""
    prepared = read_data(data, text_columns=text_columns, label_column=label_column,
                         validation_split=validation_split, seed=seed, task=task, drop_empty=drop_empty)
    info = prepared.info
    dev_samples, dev_seed, eval_on = dev
    if dev_samples:  # before labels and encoding: held-out rows are never trained on or calibrated with
        from .holdout import hold_out

        prepared.splits["train"], held = hold_out(prepared.splits["train"], dev_samples, dev_seed)
        if eval_on == "dev":  # the validation split is not even read for labels: a choice never sees it
            prepared.splits = {"train": prepared.splits["train"], "validation": held}
            info.eval_split = "dev"
    task, config = decide_task(model_path, info, task)
    if task == "seq-cls":
        add_labels(prepared, label_names)
    elif label_names:
        raise RankwiseError(f"--label-names names classes; this run is {task} and has none")
    if pair_encoding == "separate":
        from .pairs import check_pair_encoding

        if task != "seq-cls":
            raise RankwiseError(f"--pair-encoding separate is for sentence-pair classification; this run is {task}")
        check_pair_encoding(pair_encoding, info.text_columns)
    tokenizer = load_tokenizer(model_path)
    length = default_max_length(tokenizer, config, max_length)
    notice = TruncationNotice(length)
    train_ds = encode(prepared.splits["train"], task, info, tokenizer, length, max_train_samples, seed, notice,
                      pair_encoding)
    eval_ds = encode(prepared.splits["validation"], task, info, tokenizer, length, max_eval_samples, seed,
                     pair_encoding=pair_encoding)
    from .tasks import collator

    return {"task": task, "info": info, "tokenizer": tokenizer, "length": length, "train": train_ds,
            "eval": eval_ds, "collate": collator(task, tokenizer)}


def _fit(method, built, ctx, s: dict, hp: dict, seed: int, dev: str, progress: bool, tmp: Path, *,
         opts: TrainOptions | None = None, resume_from: Path | None = None,
         out: Path | None = None) -> tuple[dict, dict, dict]:
    """Trainer.train between two evaluations (causal LM: before and after). Returns (eval, train_info, method_info).

    With --save-steps, Trainer's output_dir is the checkpoint folder beside `out` (it outlives a kill);
    `resume_from` is the checkpoint a --resume continues from."""
    from .checkpoints import checkpoint_dir

    opts = opts or TrainOptions()
    progress = progress and is_main_process()  # one progress report per launch, not one per process
    peft_model = built.model
    task, train_ds, eval_ds = s["task"], s["train"], s["eval"]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = count_params(peft_model)  # a 4-bit weight counts as its unquantised size
    where = f" in {len(built.plan.adapted)} layers" if built.plan is not None else ""
    say(f"training {trainable:,} of {total:,} parameters ({built.lora_params:,} {method.name}{where}) "
        f"on {len(train_ds):,} examples, {dev}", progress)
    # as Trainer counts: batches are sharded over the processes, then grouped by accumulation
    batches = math.ceil(math.ceil(len(train_ds) / hp["batch_size"]) / world_size())
    planned = hp["max_steps"] or math.ceil(max(math.ceil(batches / opts.grad_accum), 1) * hp["epochs"])
    trainer_dir = checkpoint_dir(out) if opts.save_steps and out is not None else tmp / "trainer"
    trainer = make_trainer(peft_model, s["tokenizer"], task, s["info"].label_type, out_dir=str(trainer_dir),
                           train_ds=train_ds, eval_ds=eval_ds, lr=hp["lr"], epochs=hp["epochs"],
                           batch_size=hp["batch_size"], max_steps=hp["max_steps"], seed=seed, device=dev,
                           progress=progress, logging_steps=max(1, planned // 25), options=opts)
    ctx.total_steps = planned
    for cb in method.callbacks(built, ctx):
        trainer.add_callback(cb)
    from .guards import NonFiniteGuard

    trainer.add_callback(NonFiniteGuard())  # a NaN loss stops the run (exit 1), no run folder
    if dev.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    evaluation = {"split": s["info"].eval_split, "num_samples": len(eval_ds)}
    if task == "causal-lm":  # the "does training help" baseline: the same eval before any step
        before = trainer.evaluate()
        evaluation["eval_loss_before"] = float(before["eval_loss"])
        evaluation["perplexity_before"] = perplexity_of(before["eval_loss"])
    start = time.perf_counter()
    if resume_from is not None:
        say(f"resuming from {resume_from}", progress)
    state = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    wall = time.perf_counter() - start
    history = list(trainer.state.log_history)  # before the final evaluation appends its own entry
    metrics = clean_metrics(trainer.evaluate())
    if task == "causal-lm":
        metrics["perplexity"] = perplexity_of(metrics["eval_loss"])
    evaluation.update(metrics)
    keep_tracker_logs(trainer_dir, tmp)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    method_info = method.finish(built, ctx, tmp)  # raises when the method silently degraded
    extra_train_info = (method_info or {}).pop("train_info", {})  # e.g. AdaLoRA's penalty, kept out of train_loss
    peak = peak_memory("cuda" if dev.startswith("cuda") else dev)
    train_info = {
        "trainable_params": trainable, "total_params": total, "lora_params": built.lora_params,
        "train_samples": len(train_ds), "steps": int(state.global_step), "epochs": hp["epochs"],
        "train_loss": curve_loss(loss_curve(history), state.training_loss),
        "wall_time_s": round(wall, 3),
        "peak_memory_bytes": peak,
        # CPU: peak RSS above the RSS before the model loaded (weights, activations, optimizer state; not the
        # Python libraries, which are most of a small model's RSS); CUDA: allocated memory is already that
        "peak_memory_increase_bytes": peak if dev.startswith("cuda") else max(0, peak - s["rss_start"]),
        "model_memory_bytes": model_memory(peft_model),
        "loss_curve": loss_curve(history), "lr_curve": lr_curve(history), "eval_curve": eval_curve(history),
        "resumed_from_step": step_of(resume_from), "world_size": world_size(), **extra_train_info,
    }
    return evaluation, train_info, method_info


def _save(tmp: Path, method, built, tokenizer, results, model, model_path, task, info, length, restored,
          pair_encoding="joint") -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    method.save(built, tmp)
    tokenizer.save_pretrained(str(tmp))
    if built.plan is not None:  # not plan.save: the method already wrote the run's adapter config
        built.plan.write_json(tmp / "plan.json")
    task_info = {"schema": 1, "task": task, "method": method.name, "base_model": str(model), "base_model_path": str(model_path),
                 "max_length": length, "prompt_template": "alpaca" if info.kind == "instruction" else None,
                 "data": info.to_dict(), "quantization": results["run_info"].get("quantization"),
                 "restored_heads": restored, "pair_encoding": pair_encoding}
    (tmp / "task.json").write_text(json.dumps(task_info, indent=2) + "\n")
    (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
