"""The `rankwise` command: parses, calls the API, formats output. No logic of its own.

Bad usage exits with code 2 and one line saying what was wrong.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .types import RankwiseError

__all__ = ["main", "build_parser", "parse_targets", "parse_set"]

_ANALYZE_COLUMNS = ("name", "shape", "module_type", "alpha_hill", "alpha", "num_spikes", "spectral_norm",
                    "stable_rank", "effective_rank", "frobenius_norm", "alpha_weighted")


def parse_targets(values: Sequence[str] | None):
    """CLI targets -> select_layers spec: names (space or comma separated), `re:REGEX`, or `all-linear`."""
    if not values:
        return None
    items = [v.strip() for raw in values for v in raw.split(",") if v.strip()]
    if len(items) == 1 and items[0].startswith("re:"):
        return items[0][3:]
    if any(i.startswith("re:") for i in items):
        raise RankwiseError("give either one re:REGEX or a list of module names, not both")
    return "all-linear" if items == ["all-linear"] else items


def parse_set(pairs: Sequence[str] | None) -> dict:
    """`--set key=value` allocator options; values are read as JSON when they parse (numbers, true, null)."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RankwiseError(f"--set expects key=value, got {pair!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _write(text: str, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
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

    stats = analyze(resolve_model(args.model), parse_targets(args.targets), device=args.device, progress=not args.quiet)
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
        cols = _ANALYZE_COLUMNS[1:]
        lines = [f"{'name':<{width}} " + " ".join(f"{c:>14}" for c in cols)]
        lines += [f"{r['name']:<{width}} " + " ".join(f"{_fmt(r.get(c, '')):>14}" for c in cols) for r in rows]
        text = "\n".join(lines) + "\n"
    _write(text, args.out)
    return 0


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

    args.model = resolve_model(args.model)
    if (args.budget is None) == (args.budget_rank is None):
        raise RankwiseError("give exactly one of --budget (e.g. 300k, 1.2M, 0.5%) or --budget-rank R")
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
        **parse_set(args.set),
    )
    if args.verify:
        from .apply import verify_on_skeleton

        if verify_on_skeleton(args.model, plan):
            print(f"verified: peft builds exactly these {len(plan.adapted)} ranks ({plan.spent:,} parameters)",
                  file=sys.stderr)
    if args.out:
        plan.save(args.out)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise", description="Decide where LoRA's rank goes.")
    parser.add_argument("--version", action="version", version=f"rankwise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("analyze", help="spectral metrics of every target layer (model or safetensors folder)")
    p.add_argument("model", help=_MODEL_HELP)
    _add_targets(p)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--out", help="write to FILE instead of stdout")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("strategies", help="list the registered allocators")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_strategies)

    p = sub.add_parser("plan", help="allocate a trainable-parameter budget across layers; write a peft config")
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--strategy", "-s", required=True, help="allocator name (see `rankwise strategies`)")
    p.add_argument("--budget", "-b", help="trainable LoRA parameters: 300000, 300k, 1.2M, or 0.5%% of the model")
    p.add_argument("--budget-rank", type=int, help="budget = what uniform rank R costs on the same targets")
    _add_targets(p)
    p.add_argument("--min-rank", type=int, default=1)
    p.add_argument("--max-rank", type=int, default=None, help="default: min(in, out) of each layer")
    p.add_argument("--rank-step", type=int, default=1, help="ranks are multiples of this (e.g. 4 or 8)")
    p.add_argument("--alpha-factor", type=float, default=2.0, help="lora_alpha = factor * rank (default 2)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="allocator option, e.g. --set scaling=sqrt")
    p.add_argument("--out", "-o", help="directory for plan.json and adapter_config.json")
    p.add_argument("--plot", metavar="FILE.png", help="also draw rank per layer (needs matplotlib)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the peft round trip on an empty (meta-device) copy of the model")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_plan)

    from .training.commands import register

    register(sub)  # train, eval, merge, predict, demo
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    # peft calls a transformers API that transformers 5 deprecated; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RankwiseError as e:
        print(f"rankwise {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"rankwise {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
