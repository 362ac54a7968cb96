"""`rankwise train` against the obvious hand-written Trainer + peft script, whole process, side by side.

The job (issue 23): MiniLM on SST-2, rank 8 on every linear layer, 1,000 training examples, one epoch, lr 2e-3,
batch 16, evaluated on the full validation split (872 rows):

    rankwise train minilm --data SST2 --rank 8 --targets all-linear --max-train-samples 1000 --epochs 1 \\
        --lr 2e-3 --batch-size 16

`HAND` below is the script a person would write for the same settings (load the JSON files, a seeded 1,000-row
sample, tokenize with truncation at 512, LoRA r=8 alpha=16 on query/key/value/attention output/intermediate/
output, classifier and pooler trained in full, linear schedule with 6% warmup, eval batch 32, accuracy by numpy,
adapter saved). Each variant is a fresh process (`python -m rankwise train ...` or `python hand.py`), so imports,
data loading, training, evaluation and saving all count. Rounds are interleaved, each round in a rotated order
(load drifts hit every variant alike), after one discarded warm-up round (datasets' Arrow caches, the page
cache). Reported: per-variant medians of wall time and of the child's CPU time (user + sys, less sensitive to the
machine's other load), and the ratio of each rankwise variant to the hand script (ratio of medians, and the median
of per-round ratios). `--before REV` adds rankwise as of git revision REV (its `src/` unpacked with `git archive`
into a temp folder, first on PYTHONPATH), so a fix is measured against its parent in the same run.

    python benchmarks/bench_train_overhead.py --before HEAD~1   # -> results/bench_train_overhead.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main", "HAND"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SHARED = ROOT.parent / "shared" / "data"

HAND = r'''
import json, sys, time

import numpy as np
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments, set_seed)

model_path, data, out = sys.argv[1:4]
raw = load_dataset("json", data_files={"train": f"{data}/train.jsonl", "validation": f"{data}/validation.jsonl"})
tok = AutoTokenizer.from_pretrained(model_path)


def encode(batch):
    return tok(batch["sentence"], truncation=True, max_length=512)


train = raw["train"].shuffle(seed=0).select(range(1000)).map(encode, batched=True, remove_columns=["sentence", "idx"])
val = raw["validation"].map(encode, batched=True, remove_columns=["sentence", "idx"])
set_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                    target_modules=["query", "key", "value", "intermediate.dense", "output.dense"],
                    modules_to_save=["classifier", "pooler"])
model = get_peft_model(model, config)


def accuracy(p):
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}


args = TrainingArguments(output_dir=f"{out}/trainer", per_device_train_batch_size=16, per_device_eval_batch_size=32,
                         num_train_epochs=1, learning_rate=2e-3, warmup_steps=0.06, seed=0, use_cpu=True,
                         save_strategy="no", report_to="none", logging_steps=10)
trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tok,
                  data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy)
start = time.perf_counter()
trainer.train()
train_s = time.perf_counter() - start
metrics = trainer.evaluate()
model.save_pretrained(out)
print(json.dumps({"train_s": round(train_s, 3), "accuracy": metrics["eval_accuracy"]}))
'''

JOB = ["--rank", "8", "--targets", "all-linear", "--max-train-samples", "1000", "--epochs", "1", "--lr", "2e-3",
       "--batch-size", "16"]


def _timed(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Wall and CPU seconds of one child process (runs are sequential, so the RUSAGE_CHILDREN delta is its own)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "stdout": proc.stdout}


def _variants(data: str, work: Path, before: str | None) -> dict:
    """name -> (function(out folder) -> command, extra environment)."""
    hand = work / "hand.py"
    hand.write_text(HAND)
    rw = [sys.executable, "-m", "rankwise", "train", "minilm", "--data", data, *JOB]
    out = {"hand": (lambda o: [sys.executable, str(hand), _minilm(), data, str(o)], {}),
           "rankwise": (lambda o: [*rw, "--out", str(o)], {})}
    if before:
        src = work / "before"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", before, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
        out[f"rankwise@{before}"] = (lambda o: [*rw, "--out", str(o)], {"PYTHONPATH": str(src / "src")})
    return out


def _minilm() -> str:
    from rankwise.assets import resolve_model  # light: a package lookup, no torch

    return resolve_model("minilm")


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED / "sst2"))
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--before", help="also time rankwise at this git revision (e.g. HEAD~1)")
    ap.add_argument("--out", default=str(RESULTS / "bench_train_overhead.json"))
    args = ap.parse_args(argv)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load = [_uptime()]
    with tempfile.TemporaryDirectory(prefix="bench_train_overhead_") as tmp:
        work = Path(tmp)
        variants = _variants(args.data, work, args.before)
        names = list(variants)
        times = {n: {"wall": [], "cpu": []} for n in names}
        extra = {n: [] for n in names}
        for r in range(args.repeats + 1):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                make, more = variants[n]
                out = work / f"{n.replace('@', '_')}-{r}"
                res = _timed(make(out), {**env, **more}, work)
                if r == 0:
                    continue  # warm-up round
                times[n]["wall"].append(res["wall"])
                times[n]["cpu"].append(res["cpu"])
                if n == "hand":
                    extra[n].append(json.loads(res["stdout"].strip().splitlines()[-1]))
                else:
                    rj = json.loads((out / "results.json").read_text())
                    extra[n].append({"train_s": rj["train_info"]["wall_time_s"],
                                     "accuracy": rj["eval"]["eval_accuracy"]})
            load.append(_uptime())
            if r:
                print(f"round {r}: " + ", ".join(f"{n} {times[n]['wall'][-1]:.1f}s wall "
                                                 f"{times[n]['cpu'][-1]:.1f}s cpu" for n in names), flush=True)
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    ratios = {n: {k: med[n][k] / med["hand"][k] for k in ("wall", "cpu")} for n in names if n != "hand"}
    per_round = {n: {k: statistics.median(a / b for a, b in zip(times[n][k], times["hand"][k]))
                     for k in ("wall", "cpu")} for n in names if n != "hand"}
    result = {
        "benchmark": "bench_train_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "uptime_before_and_after_each_round": load},
        "versions": {p: md.version(p) for p in ("rankwise", "torch", "transformers", "peft", "datasets")}
        | {"python": platform.python_version()},
        "git_head": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                   text=True).stdout.strip(),
        "config": {"model": "minilm (all-MiniLM-L6-v2)", "data": args.data,
                   "rankwise_command": "rankwise train minilm --data DATA " + " ".join(JOB),
                   "hand_script": "HAND in benchmarks/bench_train_overhead.py", "repeats": args.repeats,
                   "warmup_rounds": 1, "order": "interleaved, rotated each round", "before": args.before},
        "seconds": times,
        "median_seconds": med,
        "ratio_to_hand": ratios,
        "median_per_round_ratio_to_hand": per_round,
        "runs": extra,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(out)
    print(json.dumps({k: result[k] for k in ("median_seconds", "ratio_to_hand", "median_per_round_ratio_to_hand")},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
