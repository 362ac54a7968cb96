"""CLI glue for `rankwise sweep` and `rankwise report`: parse, call the API, print. No logic here."""

from __future__ import annotations

import sys

from ..parsing import command_line

__all__ = ["register", "cmd_sweep", "cmd_report", "cmd_paper"]


def cmd_sweep(args) -> int:
    from pathlib import Path

    from .spec import load_experiment
    from .sweep import format_dry_run, sweep

    if args.cold:  # each run its own `python -m rankwise train` process (rankwise.warm explains the default)
        import os

        os.environ["RANKWISE_COLD_RUNS"] = "1"
    if args.dry_run:
        exp = load_experiment(args.experiment)
        print(format_dry_run(exp, Path(args.out)))
        return 0
    try:
        s = sweep(args.experiment, args.out, jobs=args.jobs, launcher=args.launcher, address=args.address,
                  progress=not args.quiet, command=command_line(args))
    except KeyboardInterrupt:
        print(f"rankwise sweep: interrupted; finished runs are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    print(f"{s['total']} runs: {s['skipped']} already finished, {s['ran']} ran, {len(s['failed'])} failed "
          f"-> {s['out']}", file=sys.stderr)
    if s["failed"]:
        print("failed (logs in OUT/logs; re-run to retry): " + ", ".join(s["failed"]), file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from .report import make_report

    paths = make_report(args.sweep_dir, args.out, tolerance=args.tolerance, figures=not args.no_figures,
                        command=command_line(args))
    for p in paths:
        print(p)
    return 0


def cmd_paper(args) -> int:
    from .paper import make_paper

    for p in make_paper(args.studies, args.out, v2=args.v2, tolerance=args.tolerance, figures=not args.no_figures):
        print(p)
    return 0


def register(sub) -> None:
    """Add the sweep and report subcommands to an argparse subparsers object."""
    p = sub.add_parser("sweep", help="run an experiment grid (YAML): one `rankwise train` per cell, resumable")
    p.add_argument("experiment", help="experiment file (YAML; see docs/sweep.md)")
    p.add_argument("--out", "-o", required=True, help="sweep folder (re-running resumes it)")
    p.add_argument("--jobs", "-j", type=int, default=None,
                   help="runs at a time (local: default 1; ray: default as many as the cluster places)")
    p.add_argument("--dry-run", action="store_true", help="list every run and the LoRA parameters it will spend")
    p.add_argument("--launcher", choices=("local", "ray"), default="local")
    p.add_argument("--address", help="ray: cluster address (host:port or auto); default starts a local instance")
    p.add_argument("--cold", action="store_true",
                   help="start every run as its own process (default: forked from a warm worker that imported "
                        "torch, transformers and peft once; same results, seconds less per run)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="tables (Markdown, LaTeX) and figures from a sweep folder's results")
    p.add_argument("sweep_dir", help="the --out folder of `rankwise sweep` (or any folder of run folders)")
    p.add_argument("--out", "-o", required=True, help="report folder")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="largest relative budget difference compared (default 0.02 = 2%%)")
    p.add_argument("--no-figures", action="store_true", help="tables only (no matplotlib needed)")
    p.set_defaults(func=cmd_report)

    from .paper import STUDIES, V2_STUDY

    p = sub.add_parser("paper", help="the paper's numbers (LaTeX macros), tables and figures from committed sweeps")
    p.add_argument("studies", nargs="*", default=list(STUDIES), help=f"sweep folders (default: {' '.join(STUDIES)})")
    p.add_argument("--out", "-o", default="paper/generated", help="folder for numbers.tex, tab-*.tex, figures/")
    p.add_argument("--v2", default=V2_STUDY, help="study v2's folder: tables when complete, progress otherwise")
    p.add_argument("--tolerance", type=float, default=0.02, help="largest relative budget difference compared")
    p.add_argument("--no-figures", action="store_true", help="numbers and tables only (no matplotlib needed)")
    p.set_defaults(func=cmd_paper)
