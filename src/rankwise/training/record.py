"""What a run records about itself in results.json: versions, peak memory, curves, the run_info block."""

from __future__ import annotations

import os
import platform
import resource
import sys
from datetime import datetime, timezone

__all__ = ["versions", "hardware", "peak_memory", "current_rss", "loss_curve", "perplexity_of", "run_info"]


def versions() -> dict:
    import datasets
    import peft
    import torch
    import transformers

    from .. import __version__

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
    return [{"step": int(h["step"]), "loss": float(h["loss"])} for h in log_history if "loss" in h and "step" in h]


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
