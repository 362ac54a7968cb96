"""What a run records about itself in results.json: versions, peak memory, curves, the run_info block; and the
type checks of task.json and results.json when they are read back."""

from __future__ import annotations

import os
import platform
import resource
import sys
from datetime import datetime, timezone

from ..types import RankwiseError

__all__ = ["versions", "hardware", "peak_memory", "current_rss", "loss_curve", "perplexity_of", "run_info",
           "CorruptRecord", "check_task_json", "check_results_json"]


def versions() -> dict:
    import datasets
    import peft
    import torch
    import transformers

    from ..version import __version__

    return {"rankwise": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "datasets": datasets.__version__, "python": platform.python_version()}


def hardware(device: str) -> dict:
    """The machine a run trained on: a study may mix machines, and its report says which run used which."""
    import torch

    info = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def peak_memory(device: str) -> int:
    """Peak bytes: CUDA allocated on GPU, process RSS on CPU (Linux reports ru_maxrss in KiB)."""
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def current_rss() -> int:
    """Resident memory of this process now (Linux /proc; 0 elsewhere, so an increase is then the whole peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def loss_curve(log_history: list[dict]) -> list[dict]:
    return [{"step": int(h["step"]), "loss": float(h["loss"]),
             **({"orth_penalty": float(h["orth_penalty"])} if "orth_penalty" in h else {})}
            for h in log_history if "loss" in h and "step" in h]


def perplexity_of(loss: float) -> float:
    from .metrics import perplexity

    return perplexity(float(loss))


def run_info(model, model_path, task, data, info, adapter, plan, seed, dev, command, hparams, out) -> dict:
    return {
        "model": str(model), "model_path": str(model_path), "task": task, "data": str(data),
        "data_info": info.to_dict(), "out": str(out),
        "adapter": {**adapter, **({"budget": plan.budget.to_dict(), "spent": plan.spent,
                                   "layers_adapted": len(plan.adapted)} if plan is not None else {})},
        "method": adapter.get("method", "lora"),
        "strategy": plan.strategy if plan is not None else adapter.get("strategy"), "preset": adapter.get("preset"),
        "budget": plan.budget.to_dict() if plan is not None else adapter.get("budget"),
        "hparams": hparams, "seed": seed, "device": dev, "hardware": hardware(dev), "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
    }


# ----- reading a run's records back: wrong types are "corrupt FILE: field X must be ...", never a TypeError ------
class CorruptRecord(RankwiseError):
    """A task.json or results.json whose fields have the wrong types (hand-edited, or another program's)."""


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_or_none(v) -> bool:
    return v is None or isinstance(v, str)


def _dict_or_none(v) -> bool:
    return v is None or isinstance(v, dict)


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _id2label(v) -> bool:
    return v is None or (isinstance(v, dict) and all(isinstance(k, str) and k.lstrip("-").isdigit() and
                                                      isinstance(x, str) for k, x in v.items()))


def _label2id(v) -> bool:
    return v is None or (isinstance(v, dict) and all(isinstance(k, str) and _int(x) for k, x in v.items()))


def _one_of(*values):
    return (lambda v: v in values), "one of " + ", ".join(repr(x) for x in values)


# (field, required, test, what it must be); dotted fields look inside a dict checked by an earlier row
_TASK_FIELDS = [
    ("task", True, *_one_of("seq-cls", "causal-lm")), ("base_model", True, lambda v: isinstance(v, str), "a string"),
    ("base_model_path", True, lambda v: isinstance(v, str), "a string"), ("data", True, lambda v: isinstance(v, dict),
                                                                          "an object (the data description)"),
    ("method", False, lambda v: isinstance(v, str), "a string"),
    ("max_length", True, lambda v: _int(v) and v > 0, "a positive integer"),
    ("prompt_template", False, _str_or_none, "a string or null"),
    ("quantization", False, _dict_or_none, "an object or null"),
    ("restored_heads", False, lambda v: v is None or _str_list(v), "a list of module names or null"),
    ("pair_encoding", False, lambda v: v in (None, "joint", "separate"), "'joint', 'separate' or null"),
    ("data.source", False, lambda v: isinstance(v, str), "a string"),
    ("data.kind", True, *_one_of("table", "text", "instruction")),
    ("data.text_columns", False, _str_list, "a list of column names"),
    ("data.label_column", False, _str_or_none, "a column name or null"),
    ("data.label_type", False, lambda v: v in (None, "class", "regression"), "'class', 'regression' or null"),
    ("data.id2label", False, _id2label, "an object {\"0\": name, ...} or null"),
    ("data.label2id", False, _label2id, "an object {value: class id} or null"),
    ("data.num_labels", False, lambda v: v is None or (_int(v) and v > 0), "a positive integer or null"),
    ("data.eval_split", False, lambda v: isinstance(v, str), "a string"),
    ("data.detected", False, _dict_or_none, "an object or null"),
    ("data.dropped_empty", False, _dict_or_none, "an object or null"),
]
_RESULTS_FIELDS = [
    ("run_info", True, lambda v: isinstance(v, dict), "an object"),
    ("train_info", True, lambda v: isinstance(v, dict), "an object"),
    ("eval", True, lambda v: isinstance(v, dict), "an object"),
    ("run_info.method", False, lambda v: isinstance(v, str), "a string"),
    ("run_info.strategy", False, _str_or_none, "a string or null"),
    ("run_info.budget", False, lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("spec", ""), str)),
     "an object with a string \"spec\", or null"),
    ("run_info.seed", False, _int, "an integer"),
    ("run_info.data", False, lambda v: isinstance(v, str), "a string"),
    ("run_info.adapter", False, lambda v: isinstance(v, dict), "an object"),
    ("run_info.hparams", False, _dict_or_none, "an object or null"),
    ("run_info.versions", False, lambda v: isinstance(v, dict), "an object"),
    ("run_info.hardware", False, lambda v: isinstance(v, dict), "an object"),
    ("train_info.lora_params", True, lambda v: _int(v) and v > 0, "a positive integer"),
    ("train_info.trainable_params", True, lambda v: _int(v) and v >= 0, "a non-negative integer"),
    ("train_info.wall_time_s", True, lambda v: _num(v) and v >= 0, "a non-negative number"),
    ("train_info.peak_memory_bytes", True, _num, "a number"),
    ("train_info.loss_curve", False, lambda v: isinstance(v, list), "a list"),
    ("train_info.eval_curve", False, lambda v: isinstance(v, list), "a list"),
    ("eval.split", False, lambda v: isinstance(v, str), "a string"),
    ("eval.num_samples", False, lambda v: _int(v) and v >= 0, "a non-negative integer"),
    ("method_info", False, _dict_or_none, "an object or null"),
    ("warnings", False, lambda v: isinstance(v, list), "a list"),
]


def _check(d, fields, where: str) -> dict:
    if not isinstance(d, dict):
        raise CorruptRecord(f"corrupt {where}: it must hold a JSON object, not {type(d).__name__}")
    for name, required, test, what in fields:
        holder, key = d, name
        if "." in name:
            outer, key = name.split(".", 1)
            holder = d.get(outer)
            if not isinstance(holder, dict):
                continue  # a missing optional section: its own row already decided
        if key not in holder:
            if required:
                raise CorruptRecord(f"corrupt {where}: field {name} is missing; re-run `rankwise train`")
            continue
        if not test(holder[key]):
            raise CorruptRecord(f"corrupt {where}: field {name} must be {what}, got {holder[key]!r:.60}")
    return d


def check_task_json(d, where: str = "task.json") -> dict:
    """task.json contents with every field rankwise reads of the right type; CorruptRecord naming the first that
    is not. `where` names the file in the message."""
    return _check(d, _TASK_FIELDS, where)


def check_results_json(d, where: str = "results.json") -> dict:
    """results.json contents with every field the report and the sweep read of the right type (metrics in `eval`
    are numbers); CorruptRecord naming the first that is not."""
    _check(d, _RESULTS_FIELDS, where)
    for k, v in d["eval"].items():
        if (k.startswith("eval_") or k.startswith("perplexity")) and v is not None and not _num(v):
            raise CorruptRecord(f"corrupt {where}: field eval.{k} must be a number, got {v!r:.60}")
    return d
