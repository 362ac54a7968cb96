"""CLI glue for `rankwise train | eval | merge | predict | demo`: parse, call the API, print. No logic here.

`register(subparsers)` is called by rankwise.cli; each command is `fn(args) -> int` and bad usage raises
RankwiseError (the CLI prints it as one line and exits 2).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..parsing import command_line, number, parse_set, parse_targets
from ..types import RankwiseError
from .config import attach_config
from .options import SCHEDULERS
from .pairs import PAIR_ENCODINGS
from .prepare import quiet_libraries

__all__ = ["register", "cmd_train", "cmd_eval", "cmd_merge", "cmd_predict", "cmd_demo"]

_MODEL_HELP = "model folder, alias (minilm, smollm2), or hub id (online)"
_DATA_HELP = ("folder with train/validation(/test) files (.jsonl .csv .tsv .parquet .txt), one such file "
              "(validation split off), or a hub id like nyu-mll/glue:sst2 (online)")


def _targets(values):
    return parse_targets(values)


def _options(pairs):
    return parse_set(pairs)


def cmd_train(args) -> int:
    from . import train

    if args.model and args.model_opt and args.model != args.model_opt:
        raise RankwiseError(f"two models given ({args.model} and --model {args.model_opt}); give one")
    model = args.model or args.model_opt
    if not model:
        raise RankwiseError("no model: rankwise train MODEL --data DATA (MODEL: folder, minilm, smollm2, hub id)")
    if not args.data:
        raise RankwiseError("no data: rankwise train MODEL --data DATA (or `data:` in the --config file)")
    options = _options(args.set)
    method_options = {}
    if args.method != "lora":  # --set configures the method (e.g. AdaLoRA's tinit), not an allocator
        method_options, options = options, None
    if args.ranks is not None:  # an empty --ranks "" is an error for the method, not "no ranks"
        method_options["ranks"] = args.ranks
    results = train(
        model, args.data, method=args.method, method_options=method_options, task=args.task, out=args.out, text_columns=_split(args.text_columns),
        label_column=args.label_column, validation_split=args.validation_split,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, max_length=args.max_length,
        plan=args.plan, strategy=args.strategy, budget=args.budget, budget_rank=args.budget_rank, preset=args.preset,
        rank=args.rank, targets=_targets(args.targets), strategy_options=options, calib_samples=args.calib_samples,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, dora=args.dora, rslora=args.rslora,
        quantize=args.quantize, quant_type=args.quant_type, double_quant=args.double_quant,
        compute_dtype=args.compute_dtype,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_steps=args.max_steps, seed=args.seed,
        device=args.device, overwrite=args.overwrite, progress=not args.quiet, command=command_line(args),
        **_habits(args),
    )
    from .options import is_main_process

    if not is_main_process():
        return 0  # data-parallel launch: rank 0 alone writes the run and prints its summary
    print(json.dumps({"out": results["run_info"]["out"], "eval": results["eval"],
                      "trainable_params": results["train_info"]["trainable_params"],
                      "wall_time_s": results["train_info"]["wall_time_s"],
                      "warnings": results.get("warnings", [])}, indent=2))
    return 0


def _habits(args) -> dict:
    """The Trainer-habit and data-reading flags of `rankwise train` (docs/train.md), as train() keywords."""
    return dict(grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                scheduler=args.scheduler, bf16=args.bf16, fp16=args.fp16, save_steps=args.save_steps,
                save_total_limit=args.save_total_limit, eval_steps=args.eval_steps,
                report_to=_split(args.report_to), train_args=args.train_arg or [], resume=args.resume,
                label_names=_split(args.label_names), drop_empty=args.drop_empty,
                pair_encoding=args.pair_encoding, dev_samples=args.dev_samples, dev_seed=args.dev_seed,
                eval_on=args.eval_on)


def _split(values):
    if not values:
        return None
    return [v.strip() for raw in values for v in raw.split(",") if v.strip()]


def cmd_eval(args) -> int:
    from . import evaluate_run

    from ..outputs import check_file_out, write_text_atomic
    from .prepare import pick_device
    from .runs import run_inputs

    pick_device(args.device)  # a bad --device fails at once, before the run folder is read
    check_file_out(args.out, args.overwrite, inputs=[args.data, *run_inputs(args.run_dir)])  # never the run or data
    with quiet_libraries(not args.quiet):
        metrics = evaluate_run(args.run_dir, args.data, split=args.split, max_eval_samples=args.max_eval_samples,
                               batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    text = json.dumps(metrics, indent=2)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    print(text)
    return 0


def cmd_merge(args) -> int:
    from . import merge_run

    with quiet_libraries(not args.quiet):
        merge_run(args.run_dir, args.out, overwrite=args.overwrite, progress=not args.quiet)
    return 0


def cmd_predict(args) -> int:
    from . import predict

    texts = list(args.text or [])
    if args.file:
        texts += [line for line in Path(args.file).read_text().splitlines() if line.strip()]
    if not texts:
        raise RankwiseError("give --text \"...\" (repeatable) or --file FILE with one text per line")
    if args.adapters or not args.run_dir:
        return _predict_adapters(args, texts)
    with quiet_libraries(False):  # stdout is JSON lines; load reports would only clutter the terminal
        rows = predict(args.run_dir, texts, text_pairs=args.text_pair, max_new_tokens=args.max_new_tokens,
                       device=args.device)
    for text, row in zip(texts, rows):
        print(json.dumps({"text": text, **{("output" if k == "text" else k): v for k, v in row.items()}}))
    return 0


def _predict_adapters(args, texts) -> int:
    """`--adapters a=RUN1,b=RUN2`: every adapter on one base model, one JSON line per adapter and text."""
    from ..adapters import load_adapters

    if args.adapters and args.run_dir:
        raise RankwiseError("give RUN_DIR or --adapters NAME=RUN,..., not both")
    if not args.adapters:
        raise RankwiseError("give a RUN_DIR, or --adapters NAME=RUN_DIR,NAME=RUN_DIR")
    with quiet_libraries(False):
        ads = load_adapters(args.adapters, device=args.device)
        each = ads.predict_each(texts, text_pairs=args.text_pair, max_new_tokens=args.max_new_tokens)
    for name, rows in each.items():
        for text, row in zip(texts, rows):
            print(json.dumps({"adapter": name, "text": text,
                              **{("output" if k == "text" else k): v for k, v in row.items()}}))
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    run_demo(out=args.out, train_samples=args.train_samples, eval_samples=args.eval_samples,
             budget_rank=args.budget_rank, seed=args.seed, progress=not args.quiet)
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a LoRA adapter with a plan, preset or rank (Trainer + peft)")
    p.add_argument("model", nargs="?", help=_MODEL_HELP)
    p.add_argument("--model", dest="model_opt", metavar="MODEL", help="same as the positional MODEL")
    p.add_argument("--data", help=_DATA_HELP)
    p.add_argument("--config", metavar="FILE.yaml",
                   help="flags from a YAML file (keys mirror the flags: max_train_samples: 1000); flags given here win")
    p.add_argument("--task", default="auto", choices=("auto", "seq-cls", "causal-lm"))
    p.add_argument("--text-columns", nargs="+", metavar="COL", help="text column(s); two make sentence pairs")
    p.add_argument("--label-column", metavar="COL")
    p.add_argument("--label-names", nargs="+", metavar="NAME",
                   help="names of integer classes 0..K-1 in order (a,b,c), shown by predict")
    p.add_argument("--drop-empty", action="store_true",
                   help="drop rows with an empty text or label (default: an error naming them)")
    p.add_argument("--validation-split", type=number(float, lo=0, hi=1, lo_open=True, hi_open=True), default=0.1,
                   help="for a single file (default 0.1)")
    p.add_argument("--max-train-samples", type=number(int, lo=1))
    p.add_argument("--max-eval-samples", type=number(int, lo=1))
    p.add_argument("--dev-samples", type=number(int, lo=1), metavar="N",
                   help="hold out N training rows (fixed by --dev-seed, not --seed) that this run never trains on")
    p.add_argument("--dev-seed", type=number(int, lo=0), default=0, help="which rows --dev-samples holds out")
    p.add_argument("--eval-on", choices=("validation", "dev"), default="validation",
                   help="evaluate on the validation split (default) or the held-out rows (settings are chosen "
                        "there, never on validation; docs/sweep.md, tune:)")
    p.add_argument("--max-length", type=number(int, lo=8),
                   help="tokens per example/block (default: model limit, at most 512)")
    p.add_argument("--pair-encoding", default="joint", choices=PAIR_ENCODINGS,
                   help="sentence pairs: joint (default; one [CLS] a [SEP] b [SEP] sequence) or separate (each "
                        "sentence encoded alone, mean-pooled; for sentence-embedding models; docs/train.md)")
    g = p.add_argument_group("adapter (one of; default --preset balanced)")
    g.add_argument("--method", default="lora",
                   help="training method: lora (default; static plan), multirank, adalora (see docs/methods.md)")
    g.add_argument("--ranks", metavar="R1,R2,...", help="multirank: branch ranks, e.g. 32,16,8,4,2")
    g.add_argument("--plan", metavar="DIR", help="a folder written by `rankwise plan --out`")
    g.add_argument("--strategy", "-s", help="allocator, planned inline (with --budget or --budget-rank)")
    g.add_argument("--budget", "-b", help="trainable LoRA parameters: 300k, 1.2M, 0.5%%")
    g.add_argument("--budget-rank", type=number(int, lo=1), help="budget = what uniform rank R costs on the targets")
    g.add_argument("--preset", choices=("efficient", "balanced", "expressive", "qlora_memory", "qlora_quality"),
                   help="qlora_memory / qlora_quality also load the base model in 4 bits")
    g.add_argument("--rank", "-r", type=number(int, lo=1), help="plain LoRA rank R on --targets (default all-linear)")
    g.add_argument("--targets", nargs="+", metavar="T", help="module names, 're:REGEX', or all-linear")
    g.add_argument("--calib-samples", type=int, metavar="N",
                   help="activation/gradient/eva strategies: training examples measured before training (default 256)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="strategy option (lora) or method option (multirank, adalora)")
    g.add_argument("--lora-alpha", type=number(float, lo=0, lo_open=True),
                   help="one alpha for every layer (default: the plan's, 2 x rank)")
    g.add_argument("--lora-dropout", type=number(float, lo=0, hi=1, hi_open=True), default=0.0,
                   help="in [0, 1) (default 0)")
    g.add_argument("--dora", action="store_true", help="weight-decomposed LoRA (peft use_dora)")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    q = p.add_argument_group("QLoRA (bitsandbytes; see docs/qlora.md)")
    q.add_argument("--quantize", choices=("4bit", "8bit"), help="load the base model's linear layers quantised")
    q.add_argument("--quant-type", choices=("nf4", "fp4"), help="4-bit data type (default nf4)")
    q.add_argument("--double-quant", action="store_true", help="4-bit: quantise the quantisation constants too")
    q.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"),
                   help="4-bit: dtype of each matmul (default float32)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=number(float, lo=0, lo_open=True), default=1.0)
    t.add_argument("--lr", type=number(float, lo=0, lo_open=True), help="default 2e-3 (seq-cls), 2e-4 (causal-lm)")
    t.add_argument("--batch-size", type=number(int, lo=1), default=16)
    t.add_argument("--max-steps", type=number(int, lo=1), help="stop after N optimizer steps (overrides --epochs)")
    t.add_argument("--seed", type=number(int, lo=0, hi=2**32 - 1), default=0)
    t.add_argument("--device", default="auto", help="auto (default), cpu, cuda, or cuda:N")
    t.add_argument("--grad-accum", type=number(int, lo=1), default=1, metavar="N",
                   help="gradient accumulation: one optimizer step per N batches (default 1)")
    t.add_argument("--warmup-ratio", type=number(float, lo=0, hi=1, hi_open=True), default=0.06,
                   help="share of the steps with a linear LR warm-up (default 0.06)")
    t.add_argument("--weight-decay", type=number(float, lo=0), default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument("--scheduler", default="linear", choices=SCHEDULERS, help="LR schedule after warm-up")
    mp = t.add_mutually_exclusive_group()
    mp.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (CPU or GPU)")
    mp.add_argument("--fp16", action="store_true", help="float16 mixed precision (GPU)")
    t.add_argument("--eval-steps", type=number(int, lo=1), metavar="N", help="also evaluate every N steps")
    t.add_argument("--report-to", nargs="+", metavar="NAME", help="tensorboard, wandb, mlflow, or none (default)")
    t.add_argument("--train-arg", action="append", metavar="KEY=VALUE",
                   help="any other transformers TrainingArguments field, e.g. max_grad_norm=0.5 (repeatable)")
    c = p.add_argument_group("checkpoints (docs/train.md#checkpoints-and-resume)")
    c.add_argument("--save-steps", type=number(int, lo=1), metavar="N",
                   help="checkpoint every N steps into .OUT.checkpoints/ beside --out (removed after success)")
    c.add_argument("--save-total-limit", type=number(int, lo=1), metavar="K", help="keep only the last K checkpoints")
    c.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--out", "-o", help="run folder (default runs/MODEL-TASK-TIMESTAMP)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder that rankwise wrote (see docs/safety.md)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)
    attach_config(p)


def cmd_export(args) -> int:
    from ..exporting import export

    opts = {"merge": True} if args.merge else {}
    if args.with_base:
        opts["with_base"] = True
    with quiet_libraries(not args.quiet):
        export(args.run_dir, args.out, format=args.format, rank=args.rank, energy=args.energy,
               overwrite=args.overwrite, progress=not args.quiet, **opts)
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write any trained run as a plain peft LoRA adapter (or mlx, merged)")
    p.add_argument("run_dir", help="a folder written by `rankwise train` (any --method)")
    p.add_argument("--out", "-o", required=True, help="folder to write")
    p.add_argument("--format", default="peft", help="peft (default), mlx, merged")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--rank", type=number(int, lo=1), help="compress each layer by SVD to at most rank K")
    c.add_argument("--energy", type=number(float, lo=0, hi=1, lo_open=True),
                   help="per layer, the fewest ranks keeping this share of the energy, in (0, 1]")
    p.add_argument("--merge", action="store_true", help="mlx: write fused weights instead of an adapter")
    p.add_argument("--with-base", action="store_true", help="mlx: also write base/, a base folder mlx-lm reads")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_export)


def register(sub) -> None:
    """Add the train, eval, merge, predict, export and demo subcommands to an argparse subparsers object."""
    _add_train(sub)
    _add_export(sub)

    p = sub.add_parser("eval", help="evaluate a trained run on data")
    p.add_argument("run_dir", help="a folder written by `rankwise train`")
    p.add_argument("--data", required=True, help=_DATA_HELP)
    p.add_argument("--split", default="validation", help="split of a data folder (default validation)")
    p.add_argument("--max-eval-samples", type=number(int, lo=1))
    p.add_argument("--batch-size", type=number(int, lo=1), default=32)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, or cuda:N")
    p.add_argument("--out", help="also write the metrics JSON to FILE")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file that rankwise did not write (see docs/safety.md)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="fold a run's adapter into the base weights; save model + tokenizer")
    p.add_argument("run_dir")
    p.add_argument("--out", "-o", required=True, help="folder for the merged model")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("predict", help="label/score texts, or generate text, with a trained run")
    p.add_argument("run_dir", nargs="?", help="a folder written by `rankwise train` (or give --adapters)")
    p.add_argument("--adapters", metavar="NAME=RUN,...",
                   help="several runs on one base model: each adapter's prediction (see docs/adapters.md)")
    p.add_argument("--text", action="append", help="input text (repeatable)")
    p.add_argument("--text-pair", action="append", help="second sentence for pair tasks (one per --text)")
    p.add_argument("--file", help="one text per line")
    p.add_argument("--max-new-tokens", type=number(int, lo=1), default=64, help="causal LM: tokens to generate")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, or cuda:N")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="MiniLM on tweets: spectral vs uniform LoRA at the same budget")
    p.add_argument("--out", default="demo_out", help="folder for both runs (default demo_out)")
    p.add_argument("--train-samples", type=number(int, lo=1), default=2000)
    p.add_argument("--eval-samples", type=number(int, lo=1), default=500)
    p.add_argument("--budget-rank", type=number(int, lo=1), default=8,
                   help="budget = uniform rank R on all linear layers")
    p.add_argument("--seed", type=number(int, lo=0, hi=2**32 - 1), default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
