"""Use a finished run folder: evaluate it on data, merge it into the base weights, or predict with it."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from ..types import RankwiseError
from .data import DataInfo
from .prepare import (clean_metrics, encode, make_trainer, pick_device, quiet_libraries, read_data,
                      resolve_model_path, say)
from .tasks import format_prompt, load_model, load_tokenizer

__all__ = ["load_run", "run_inputs", "check_run_base", "load_run_model", "evaluate_run", "merge_run", "predict", "predict_with", "restores_head"]


def load_run(run_dir: str | os.PathLike) -> dict:
    """task.json of a run folder, with a one-line error when the folder is not a rankwise run."""
    p = Path(run_dir)
    # adapter_config.json: peft methods; multirank_config.json: multi-rank (not a peft type, see docs/methods.md)
    adapter = any((p / f).is_file() for f in ("adapter_config.json", "multirank_config.json"))
    if not (p / "task.json").is_file() or not adapter:
        raise RankwiseError(f"{run_dir} is not a rankwise run folder (no task.json/adapter_config.json); "
                            "give the --out folder of `rankwise train`")
    try:
        task_info = json.loads((p / "task.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RankwiseError(f"{p / 'task.json'} is corrupt ({str(e).splitlines()[0][:120]}); re-run "
                            "`rankwise train` for this folder") from None
    from .record import check_task_json

    return check_task_json(task_info, str(p / "task.json"))  # wrong types: one line naming the field


def run_inputs(run_dir: str | os.PathLike) -> list[str]:
    """What a command using this run reads: the run folder and its base model folder (an output may be neither)."""
    return [str(run_dir), load_run(run_dir)["base_model_path"]]


def check_run_base(base_model, run_dir: str | os.PathLike) -> None:
    """Raise RankwiseError unless `base_model` (loaded for the run) is the model the run was trained on, by the
    rule training applies a plan with (apply.check_plan_fits against the run's plan.json and its fingerprint):
    a planned layer missing or of another shape is an error; differences elsewhere are `warning:` lines. A base
    folder that now holds another model with the same layer shapes but fewer layers would otherwise load with
    peft's "keys did not match" warnings only, and predict nonsense."""
    p = Path(run_dir) / "plan.json"
    if not p.is_file():
        return  # runs without a plan (none written by rankwise today): nothing to check against
    from ..apply import check_plan_fits
    from ..plan import Plan

    try:
        notes = check_plan_fits(base_model, Plan.load(p))
    except RankwiseError as e:  # the plan's own advice (re-plan this model) does not fit a trained run
        why = re.sub(r";? *\(?re-run `rankwise plan` on this model\)?", "", str(e))
        raise RankwiseError(f"the base model is not the one {run_dir} was trained on: {why}; put that model back "
                            "at task.json's base_model_path, or retrain") from None
    for note in notes:
        print(f"warning: base model of {run_dir}: {note}", file=sys.stderr)


def _base_path(task_info: dict) -> str:
    """The base model: its recorded folder when it still exists, else the alias or hub id it was given.

    Runs record the absolute folder. A relative `base_model` is never re-resolved against the current directory
    (that would silently load another model of the same name); a missing folder is an error naming it."""
    from ..assets import MODEL_ALIASES

    path, name = str(task_info["base_model_path"]), str(task_info["base_model"])
    if Path(path).exists():
        return path
    if name in MODEL_ALIASES:
        return resolve_model_path(name)
    if path == name and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name  # a hub id: loading says whether it can be reached
    raise RankwiseError(f"the run's base model {path} no longer exists; put it back, or retrain")


def restores_head(task_info: dict) -> bool:
    """True when the run (its task.json dict) records task heads that the base checkpoint lacks (`restored_heads`,
    found by structure at train time), so the base's "newly initialized" report is expected. Runs written before
    that key existed answer False: the report shows, which is harmless."""
    heads = task_info.get("restored_heads")
    return isinstance(heads, list) and bool(heads)


def load_run_model(run_dir: str | os.PathLike, device: str = "cpu", full_precision: bool = False):
    """(PeftModel in eval mode, tokenizer, task.json dict, DataInfo) for a run folder.

    A QLoRA run's base model loads quantised as it was trained (so eval reproduces results.json), unless
    `full_precision` (merge: the adapter is folded into the unquantised weights)."""
    from ..methods import method_of_run
    from .quantize import QuantSpec

    task_info = load_run(run_dir)
    method = method_of_run(run_dir)
    info = DataInfo.from_dict(task_info["data"])
    quant = None if full_precision else QuantSpec.from_dict(task_info.get("quantization"))
    # The head is new to the base checkpoint but restored from the adapter: transformers' "newly initialized"
    # report would be a false alarm here
    with quiet_libraries(not restores_head(task_info)):
        base = load_model(_base_path(task_info), task_info["task"], info, quantization=quant, device=device)
    check_run_base(base, run_dir)
    if task_info.get("pair_encoding") == "separate":  # the head was trained on the separate-pairs forward
        from .pairs import separate_pairs

        separate_pairs(base)
    model = method.load(base, run_dir)
    model = (model if quant is not None else model.to(device)).eval()  # quantised: loaded onto `device` already
    tokenizer = load_tokenizer(str(run_dir))
    return model, tokenizer, task_info, info


def evaluate_run(run_dir: str | os.PathLike, data: str | os.PathLike, *, split: str = "validation",
                 max_eval_samples: int | None = None, batch_size: int = 32, seed: int = 0, device: str = "auto",
                 progress: bool = True) -> dict:
    """Metrics of a trained run on `data` (a folder's `split`, or a whole single file), as in results.json."""
    dev = pick_device(device)
    model, tokenizer, task_info, info = load_run_model(run_dir, dev)
    ds = _eval_split(data, info, split, seed)
    eval_ds = encode(ds, task_info["task"], info, tokenizer, task_info["max_length"], max_eval_samples, seed,
                     pair_encoding=task_info.get("pair_encoding") or "joint")
    # Trainer wants an output folder; keep it out of the run folder (which may be read-only or shared)
    with tempfile.TemporaryDirectory(prefix="rankwise-eval-") as scratch:
        trainer = make_trainer(model, tokenizer, task_info["task"], info.label_type, out_dir=scratch,
                               eval_ds=eval_ds, eval_batch_size=batch_size, device=dev, progress=progress)
        metrics = clean_metrics(trainer.evaluate())
    if task_info["task"] == "causal-lm":
        from .metrics import perplexity

        metrics["perplexity"] = perplexity(metrics["eval_loss"])
    return {"data": str(data), "split": split, "num_samples": len(eval_ds), **metrics}


def _eval_split(data, info: DataInfo, split: str, seed: int):
    p = Path(data)
    if p.is_file():  # a single file is all evaluation data: no split to hold out
        from .data import _load_file

        ds = _load_file(p)
        read_data_check(ds.column_names, info)
        return ds
    prepared = read_data(data, info=info, seed=seed)
    if split not in prepared.splits:
        raise RankwiseError(f"no {split!r} split in {data}; it has {sorted(prepared.splits)}")
    return prepared.splits[split]


def read_data_check(columns: Sequence[str], info: DataInfo) -> None:
    wanted = [c for c in info.text_columns + ([info.label_column] if info.label_column else [])]
    missing = [c for c in wanted if c not in columns and info.kind != "text"]
    if missing:
        raise RankwiseError(f"the data lacks column(s) {missing} that the run was trained on; it has {list(columns)}")


def merge_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
              progress: bool = True) -> Path:
    """Fold the adapter into the base weights (`merge_and_unload`) and save a plain transformers model + tokenizer.

    The merged folder loads with AutoModelFor...from_pretrained alone; task.json is copied for `rankwise predict`.
    A QLoRA run merges into the full-precision base model (never into 4-bit weights, which would round the update
    away); task.json's "quantization" is kept as a record of how the adapter was trained."""
    from ..outputs import atomic_dir, check_out

    task_info = load_run(run_dir)
    out = check_out(out, overwrite, protected=[run_dir, task_info.get("base_model_path")])
    model, tokenizer, task_info, _ = load_run_model(run_dir, full_precision=True)  # QLoRA: full-precision base
    merged = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.copy(Path(run_dir) / "task.json", tmp / "task.json")
    say(f"wrote merged model to {out}", progress)
    return out


def predict(run_dir: str | os.PathLike, texts: Sequence[str] | str, *, text_pairs: Sequence[str] | None = None,
            max_new_tokens: int = 64, device: str = "auto") -> list[dict]:
    """Per text: {"label", "score"} (classes), {"score"} (regression), or {"text"} (generated by a causal LM).

    For instruction runs each text is the instruction and is wrapped in the training prompt template."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise RankwiseError("give at least one --text")
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise RankwiseError(f"got {len(texts)} texts but {len(text_pairs)} text pairs; give one pair per text")
    dev = pick_device(device)
    model, tokenizer, task_info, info = load_run_model(run_dir, dev)
    return predict_with(model, tokenizer, task_info, info, texts, text_pairs=text_pairs,
                        max_new_tokens=max_new_tokens, device=dev)


def predict_with(model, tokenizer, task_info: dict, info: DataInfo, texts: list[str], *,
                 text_pairs: Sequence[str] | None = None, max_new_tokens: int = 64, device: str = "cpu") -> list[dict]:
    """`predict` with a model already loaded (rankwise.adapters runs each of several adapters through it)."""
    import torch

    dev = device
    with torch.no_grad():
        if task_info["task"] == "causal-lm":
            return [_generate(model, tokenizer, t, task_info, max_new_tokens, dev) for t in texts]
        enc = _encode_texts(tokenizer, task_info, texts, text_pairs).to(dev)
        logits = model(**enc).logits.float().cpu()
    if info.label_type == "regression":
        return [{"score": float(v)} for v in logits[:, 0]]
    probs = logits.softmax(-1)
    names = info.id2label or {}
    return [{"label": names.get(int(i), str(int(i))), "score": float(p[i])} for p, i in zip(probs, probs.argmax(-1))]


def _encode_texts(tokenizer, task_info: dict, texts: list[str], text_pairs):
    """A padded batch, encoded as the run was trained (sentence pairs jointly or separately)."""
    if task_info.get("pair_encoding") == "separate":
        from .pairs import encode_separately

        if text_pairs is None:
            raise RankwiseError("this run encodes sentence pairs separately: give a --text-pair for each --text")
        rows = encode_separately(tokenizer, texts, list(text_pairs), task_info["max_length"])
        return tokenizer.pad(rows, return_tensors="pt")
    args = [texts] + ([list(text_pairs)] if text_pairs is not None else [])
    return tokenizer(*args, truncation=True, max_length=task_info["max_length"], padding=True, return_tensors="pt")


def _generate(model, tokenizer, text: str, task_info: dict, max_new_tokens: int, dev: str) -> dict:
    prompt = format_prompt({"instruction": text}) if task_info.get("prompt_template") == "alpaca" else text
    enc = tokenizer(prompt, return_tensors="pt").to(dev)
    enc.pop("token_type_ids", None)  # BERT-style tokenizers add them; decoder LMs' generate() rejects them
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return {"text": tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()}
