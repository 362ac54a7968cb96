"""Training-step time of AdaLoRA on MiniLM-L6: rankwise's allocator vs peft's, against plain LoRA.

Three models in one process, all on all-MiniLM-L6 (sequence classification, batch 16, sequence 64, every attention
and feed-forward projection adapted, 36 layers), all at the same initial rank:

    lora        plain peft LoRA at init_rank (no allocation, no penalty)
    rankwise    `--method adalora` as built by rankwise: peft SVD layers, the vectorised orthogonal penalty, and
                the allocation step (importance EMA + masking to the budget) after every optimizer step
    peft        peft's AdaLoRA: its forward (penalty included) and `update_and_allocate` after every optimizer step

A step is forward + backward + AdamW step + (allocation) + zero_grad. The variants run interleaved (one step of
each per round, `--rounds` rounds after warm-up), and medians are reported with their ratios. Both allocators are
kept in their pruning phase (a mask every step), the most expensive case. The allocation call itself is timed
inside the step, and rankwise's allocator is broken down into its pieces.

    python benchmarks/bench_adalora.py            # -> benchmarks/results/bench_adalora.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
TOTAL, START = 400, 100  # a schedule long enough that every timed step is a pruning step with a mask


def _base():
    from transformers import AutoModelForSequenceClassification

    from rankwise.assets import minilm_path

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def build_lora(init_rank: int):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_base(), LoraConfig(r=init_rank, lora_alpha=2 * init_rank, target_modules=TARGETS,
                                               task_type="SEQ_CLS"))
    return model, None


def build_rankwise(init_rank: int, budget_rank: int):
    from rankwise.dynamic.method import AdaLoraMethod
    from rankwise.methods import MethodContext

    method = AdaLoraMethod()
    ctx = MethodContext(task="seq-cls", model_name="minilm", model_path="minilm",
                        lora_kwargs={"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]},
                        choice={"budget_rank": budget_rank, "targets": TARGETS},
                        options={"init_rank": init_rank, "tinit": 0, "tfinal": 0, "deltaT": 1}, progress=False,
                        total_steps=TOTAL)
    built = method.build(_base(), ctx)
    method.callbacks(built, ctx)
    built.model.rankwise_regulariser = built.state["regulariser"]  # for penalty_times
    return built.model, built.state["stepper"].step


def build_peft(init_rank: int, budget_rank: int):
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(init_r=init_rank, target_r=budget_rank, lora_alpha=2 * init_rank, total_step=TOTAL, tinit=0,
                        tfinal=0, deltaT=1, target_modules=TARGETS, task_type="SEQ_CLS")
    model = get_peft_model(_base(), cfg)
    return model, model.base_model.update_and_allocate


def _step(model, opt, allocate, batch, step: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    opt.step()
    t1 = time.perf_counter()
    if allocate is not None:
        allocate(step)
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, t2 - t1


def breakdown(model, stepper_step, batch, repeats: int) -> dict:
    """Median seconds of each piece of rankwise's allocation step, on real gradients of one backward."""
    import torch

    from rankwise.dynamic.importance import element_scores, ema_update, importance, mask, threshold, triplet_scores

    st = stepper_step.__self__
    model(**batch).loss.backward()
    budget = st.init_budget - (st.init_budget - st.target) // 2
    pieces = {
        "gather (cat params and grads)": lambda: (torch.cat([p.reshape(-1) for p in st._params]),
                                                  torch.cat([p.grad.reshape(-1) for p in st._params])),
        "importance + EMA": lambda: ema_update(st.avg_ipt, st.avg_unc,
                                               importance(torch.cat([p.reshape(-1) for p in st._params]),
                                                          torch.cat([p.grad.reshape(-1) for p in st._params])),
                                               st.beta1, st.beta2),
        "triplet scores (index_add)": lambda: triplet_scores(element_scores(st.avg_ipt, st.avg_unc), st._segment,
                                                             st._weight, st.n),
        "threshold + mask": lambda: mask(st.scores, threshold(st.scores, budget, st.costs)),
        "apply mask to lambdas": lambda: torch._foreach_mul_(st._E, st._keep_views),
        "rank history (per-layer counts)": st.layer_ranks,
        "whole allocation step": lambda: st._allocate(budget, START) or st._update_importance(),
    }
    out = {}
    with torch.no_grad():
        for name, fn in pieces.items():
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            out[name] = statistics.median(times)
    model.zero_grad(set_to_none=True)
    return out


def penalty_times(rk_model, peft_model, repeats: int) -> dict:
    """Forward + backward of the orthogonal penalty alone: rankwise's batched one vs peft's parameter walk."""
    import torch

    reg = rk_model.rankwise_regulariser
    tuner = peft_model.base_model

    def peft_penalty():
        total, n = 0, 0
        for name, p in tuner.model.named_parameters():  # the loop inside AdaLoraModel.forward
            if ("lora_A" in name or "lora_B" in name) and "default" in name:
                cov = p @ p.T if "lora_A" in name else p.T @ p
                total = total + torch.norm(cov - torch.eye(*cov.size(), out=torch.empty_like(cov)), p="fro")
                n += 1
        return total / n

    out = {}
    for label, fn in (("rankwise", reg), ("peft", peft_penalty)):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn().backward()
            times.append(time.perf_counter() - t)
        out[label] = statistics.median(times)
    rk_model.zero_grad(set_to_none=True)
    peft_model.zero_grad(set_to_none=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--init-rank", type=int, default=6)
    p.add_argument("--budget-rank", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", default=str(RESULTS / "bench_adalora.json"))
    a = p.parse_args(argv)
    import torch

    from rankwise.training.run import versions

    torch.manual_seed(0)
    variants = {"lora": build_lora(a.init_rank), "rankwise": build_rankwise(a.init_rank, a.budget_rank),
                "peft": build_peft(a.init_rank, a.budget_rank)}
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (a.batch, a.seq), generator=g),
             "attention_mask": torch.ones(a.batch, a.seq, dtype=torch.long),
             "labels": torch.randint(0, 2, (a.batch,), generator=g)}
    opts = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
            for k, (m, _) in variants.items()}
    for m, _ in variants.values():
        m.train()
    steps = {k: [] for k in variants}
    alloc = {k: [] for k in variants}
    load_before = os.getloadavg()
    for r in range(a.warmup + a.rounds):
        for k, (m, allocate) in variants.items():
            total, t_alloc = _step(m, opts[k], allocate, batch, START + r)
            if r >= a.warmup:
                steps[k].append(total)
                alloc[k].append(t_alloc)
    med = {k: statistics.median(v) for k, v in steps.items()}
    med_alloc = {k: statistics.median(v) for k, v in alloc.items()}
    result = {
        "benchmark": "bench_adalora",
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "versions": versions(),
        "setup": {"model": "all-MiniLM-L6-v2 (seq-cls)", "batch": a.batch, "seq": a.seq, "targets": TARGETS,
                  "layers": 36, "init_rank": a.init_rank, "budget_rank": a.budget_rank, "rounds": a.rounds,
                  "warmup": a.warmup, "phase": "pruning, a mask every step (deltaT=1)"},
        "step_seconds_median": med,
        "allocation_seconds_median": {"rankwise": med_alloc["rankwise"], "peft": med_alloc["peft"]},
        "ratios": {
            "rankwise_step / lora_step": med["rankwise"] / med["lora"],
            "peft_step / lora_step": med["peft"] / med["lora"],
            "rankwise_step / peft_step": med["rankwise"] / med["peft"],
            "rankwise_allocation / lora_step": med_alloc["rankwise"] / med["lora"],
            "peft_allocation / lora_step": med_alloc["peft"] / med["lora"],
            "rankwise_allocation / peft_allocation": med_alloc["rankwise"] / med_alloc["peft"],
        },
        "rankwise_allocation_breakdown_seconds": breakdown(variants["rankwise"][0], variants["rankwise"][1], batch,
                                                           a.rounds),
        "orth_penalty_fwd_bwd_seconds": penalty_times(variants["rankwise"][0], variants["peft"][0], a.rounds),
        "raw_step_seconds": steps,
        "raw_allocation_seconds": alloc,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(a.out)
    print(json.dumps({k: result[k] for k in ("step_seconds_median", "allocation_seconds_median", "ratios",
                                             "rankwise_allocation_breakdown_seconds",
                                             "orth_penalty_fwd_bwd_seconds")}, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(0 if main() else 1)
