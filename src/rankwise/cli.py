"""The `rankwise` command: parses, calls the API, formats output. No logic of its own.

Bad usage exits with code 2 and one line saying what was wrong.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Sequence

from .version import __version__
from .parsing import OneLineParser, check_plot_path, number, parse_set, parse_targets
from .types import RankwiseError, RankwiseFailure

__all__ = ["main", "build_parser", "parse_targets", "parse_set"]

_ANALYZE_COLUMNS = ("name", "shape", "module_type", "alpha_hill", "alpha", "num_spikes", "spectral_norm",
                    "stable_rank", "effective_rank", "frobenius_norm", "alpha_weighted")
# Added to the table with --data (csv/json carry every metric, act_evr_1..K included).
_DATA_COLUMNS = ("act_in_norm2", "act_effective_rank", "act_explained_topk", "grad_norm", "grad_sensitivity",
                 "grad_stable_rank")


def _write(text: str, out: str | None) -> None:
    if out:
        from .outputs import write_text_atomic

        write_text_atomic(out, text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v))
    return str(v)


def cmd_analyze(args) -> int:
    from .stats import analyze

    from .assets import resolve_model

    from .outputs import check_file_out

    # never the weights or data this command reads, nor a file of the user's without --overwrite
    check_file_out(args.out, args.overwrite, inputs=[args.model, resolve_model(args.model), args.data])
    _check_calibration_flags(args)
    stats = analyze(resolve_model(args.model), parse_targets(args.targets), device=args.device, progress=not args.quiet)
    calibration = _calibration(args, resolve_model(args.model))
    if calibration is not None:
        from .stats.calibration import calibrate, with_data_metrics

        stats = with_data_metrics(stats, calibrate(calibration.model, calibration, [s.info for s in stats],
                                                   progress=not args.quiet))
    rows = [s.to_dict() for s in stats]
    if args.format == "json":
        text = json.dumps(rows, indent=2) + "\n"
    elif args.format == "csv":
        buf = io.StringIO()
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows({k: _fmt(v) if k == "shape" else v for k, v in r.items()} for r in rows)
        text = buf.getvalue()
    else:
        width = max(len(r["name"]) for r in rows)
        cols = _ANALYZE_COLUMNS[1:] + (_DATA_COLUMNS if calibration is not None else ())
        lines = [f"{'name':<{width}} " + " ".join(f"{c:>14}" for c in cols)]
        lines += [f"{r['name']:<{width}} " + " ".join(f"{_fmt(r.get(c, '')):>14}" for c in cols) for r in rows]
        text = "\n".join(lines) + "\n"
    _write(text, args.out)
    return 0


def _check_strategy(strategy: str, options: dict) -> None:
    """An unknown strategy or option fails here, in milliseconds, not after the model is measured."""
    from .allocators import check_strategy

    check_strategy(strategy, options)


def _check_calibration_flags(args, strategy: str | None = None) -> None:
    """--calib-samples needs --data; a data-driven strategy needs --data (checked before any model loads)."""
    if args.calib_samples is not None and not args.data:
        raise RankwiseError("--calib-samples needs --data D (the data set whose training split is sampled)")
    if strategy is not None and not args.data:
        from .allocators.data import is_data_driven

        if is_data_driven(strategy):
            raise RankwiseError(f"strategy {strategy!r} allocates from data statistics: give --data D (a "
                                "calibration sample of its training split is measured)")


def _calibration(args, model_path):
    """--data D: the model with its task head and a seeded calibration sample of D's training split."""
    if not args.data:
        return None
    from .training.calibrate import DEFAULT_CALIB_SAMPLES, calibration_from_data

    return calibration_from_data(model_path, args.data, samples=args.calib_samples or DEFAULT_CALIB_SAMPLES,
                                 seed=args.seed, progress=not args.quiet)


def cmd_strategies(args) -> int:
    from .allocators import list_allocators

    specs = list_allocators()
    if args.format == "json":
        print(json.dumps([s.to_dict() for s in specs], indent=2))
    else:
        for s in specs:
            opts = " ".join(f"{k}={v}" for k, v in s.hparams.items())
            print(f"{s.name:<12} {s.description}" + (f"  [--set {opts}]" if opts else ""))
    return 0


def cmd_plan(args) -> int:
    from .assets import resolve_model
    from .plan import make_plan

    if (args.budget is None) == (args.budget_rank is None):
        raise RankwiseError("give exactly one of --budget (e.g. 300k, 1.2M, 0.5%) or --budget-rank R")
    check_plot_path(args.plot)
    options = parse_set(args.set)
    if args.from_run:  # the ranks a trained run discovered, as a static plan at this budget
        from .methods.discovery import check_from_run

        args.strategy, args.model = check_from_run(args.from_run, args.strategy, args.model, args.targets)
    elif args.model is None or args.strategy is None or args.strategy == "discovered":
        raise RankwiseError("give MODEL and --strategy S (rankwise plan MODEL -s S --budget B), or --from-run "
                            "RUN_DIR for the ranks a multirank/adalora run discovered")
    _check_strategy(args.strategy, options)
    _check_calibration_flags(args, args.strategy)
    args.model = resolve_model(args.model)
    if args.out:
        from .outputs import check_out

        check_out(args.out, args.overwrite,
                  protected=[args.model, getattr(args, "from_run", None), getattr(args, "data", None)])
    stats = None
    if args.from_run:
        from .methods.discovery import discovered_stats

        stats = discovered_stats(args.from_run, args.model)
        args.targets = [st.name for st in stats]  # recorded in plan.json: the run's layers are the targets
    plan = make_plan(
        args.model,
        args.strategy,
        args.budget,
        budget_rank=args.budget_rank,
        targets=parse_targets(args.targets),
        min_rank=args.min_rank,
        max_rank=args.max_rank,
        rank_step=args.rank_step,
        alpha_factor=args.alpha_factor,
        progress=not args.quiet,
        calibration=_calibration(args, args.model),
        stats=stats,
        **options,
    )
    if args.verify:
        from .apply import verify_on_skeleton

        if verify_on_skeleton(args.model, plan):
            print(f"verified: peft builds exactly these {len(plan.adapted)} ranks ({plan.spent:,} parameters)",
                  file=sys.stderr)
    if args.out:
        from .outputs import atomic_dir

        with atomic_dir(args.out) as tmp:
            plan.save(tmp)
        print(f"wrote {Path(args.out) / 'plan.json'} and adapter_config.json", file=sys.stderr)
    if args.plot:
        from .experiments.plots import plot_plan

        plot_plan(plan, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.format_table())
    return 0


_MODEL_HELP = "local model folder, safetensors checkpoint folder, alias (minilm, smollm2), or hub id (online)"


def _add_targets(p) -> None:
    p.add_argument("--targets", nargs="+", metavar="T",
                   help="module names/suffixes (space or comma separated), 're:REGEX', or 'all-linear' (default: "
                        "every Linear/Conv1D except output heads)")


def _add_data(p) -> None:
    p.add_argument("--data", metavar="D",
                   help="measure activation and gradient statistics on a sample of D's training split (the "
                        "validation split is never read); needed by the activation, gradient and eva strategies")
    p.add_argument("--calib-samples", type=number(int, lo=1), metavar="N",
                   help="training examples in the calibration sample (default 256)")
    p.add_argument("--seed", type=int, default=0, help="calibration sample and new task head seed (default 0)")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="rankwise", description="Decide where LoRA's rank goes.")
    parser.add_argument("--version", action="version", version=f"rankwise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("analyze", help="spectral metrics of every target layer (model or safetensors folder)")
    p.add_argument("model", help=_MODEL_HELP)
    _add_targets(p)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--out", help="write to FILE instead of stdout")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file that rankwise did not write (see docs/safety.md)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    _add_data(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("strategies", help="list the registered allocators")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_strategies)

    p = sub.add_parser("plan", help="allocate a trainable-parameter budget across layers; write a peft config")
    p.add_argument("model", nargs="?", help=_MODEL_HELP + " (default with --from-run: the run's base model)")
    p.add_argument("--strategy", "-s", help="allocator name (see `rankwise strategies`)")
    p.add_argument("--from-run", metavar="RUN_DIR",
                   help="plan with the ranks a multirank/adalora run discovered (strategy 'discovered')")
    p.add_argument("--budget", "-b", help="trainable LoRA parameters: 300000, 300k, 1.2M, or 0.5%% of the model")
    p.add_argument("--budget-rank", type=number(int, lo=1),
                   help="budget = what uniform rank R costs on the same targets")
    _add_targets(p)
    p.add_argument("--min-rank", type=number(int, lo=1), default=1)
    p.add_argument("--max-rank", type=number(int, lo=1), default=None, help="default: min(in, out) of each layer")
    p.add_argument("--rank-step", type=number(int, lo=1), default=1, help="ranks are multiples of this (e.g. 4 or 8)")
    p.add_argument("--alpha-factor", type=number(float, lo=0, lo_open=True), default=2.0,
                   help="lora_alpha = factor * rank (default 2)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="allocator option, e.g. --set scaling=sqrt")
    _add_data(p)
    p.add_argument("--out", "-o", help="directory for plan.json and adapter_config.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder that rankwise wrote (see docs/safety.md)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw rank per layer (needs matplotlib)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the peft round trip on an empty (meta-device) copy of the model")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_plan)

    from .training.commands import register

    register(sub)  # train, eval, merge, predict, demo
    from .experiments.commands import register as register_experiments

    register_experiments(sub)  # sweep, report
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    # peft calls a transformers API that transformers 5 deprecated; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (one line, code 2), --help and --version (code 0)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what results and reports record as the command
    return _run(args)


def _run(args) -> int:
    """Call the command; every failure becomes one line: bad input exits 2, a run that failed exits 1.

    RANKWISE_DEBUG=1 re-raises unexpected exceptions with their traceback (for bug reports)."""
    import os

    def fail(code: int, msg: str) -> int:
        print(f"rankwise {args.command}: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return code

    try:
        return int(args.func(args) or 0)
    except (RankwiseError, FileNotFoundError) as e:
        return fail(2, e)
    except RankwiseFailure as e:
        return fail(1, e)
    except KeyboardInterrupt:
        return fail(130, "interrupted")
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, with the exit code SIGPIPE gives cat
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141
    except Exception as e:  # noqa: BLE001 - a stack trace from deep inside torch tells a user nothing
        if os.environ.get("RANKWISE_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return fail(1, f"{type(e).__name__}: {first} (set RANKWISE_DEBUG=1 for the traceback)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
