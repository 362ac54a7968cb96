"""`rankwise train --config run.yaml`: a YAML file whose keys mirror the train flags; flags on the command line win.

    model: minilm                 # the positional MODEL (or --model)
    data: ../shared/data/sst2
    max_train_samples: 1000
    text_columns: [sentence]      # lists for flags that take several values
    save_steps: 20
    bf16: true                    # switches: true / false
    set: {scaling: sqrt}          # repeatable KEY=VALUE flags: a mapping (or a list of "k=v")
    train_arg: {max_grad_norm: 0.5}

The file is read with yaml.safe_load and turned into flags, so every value is checked exactly as on the command
line. An unknown key is an error naming it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["attach_config", "config_flags"]

_UNSET = object()


def _keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key -> the action it sets: each long flag name (dashes or underscores) and each dest."""
    keys = {}
    for a in parser._actions:
        if a.dest in ("help", "config", argparse.SUPPRESS):
            continue
        names = [o.lstrip("-") for o in a.option_strings if o.startswith("--")] or [a.dest]
        for n in names + [a.dest]:
            keys[n.replace("-", "_")] = a
    return keys


def _flag(action: argparse.Action) -> str:
    longs = [o for o in action.option_strings if o.startswith("--")]
    return longs[0] if longs else "--model"  # the only positional, MODEL, has --model as its flag form


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def config_flags(path: str, parser: argparse.ArgumentParser, given: set[str]) -> tuple[list[str], list[str]]:
    """(flags to put before the command line's, flags to put after it) for the keys of `path` whose flags the
    command line did not give. Raises ValueError with a one-line message."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if cfg is None:
        return [], []
    if not isinstance(cfg, dict):
        raise ValueError(f"--config {path} must be a mapping of flag names to values, got {type(cfg).__name__}")
    keys = _keys(parser)
    before, after = [], []
    for key, value in cfg.items():
        action = keys.get(str(key).replace("-", "_"))
        if action is None:
            raise ValueError(f"unknown key {key!r} in {path}: keys are the train flags without dashes "
                             "(e.g. max_train_samples, save_steps; see rankwise train --help)")
        if value is None:
            continue
        dest = "model" if action.dest == "model_opt" else action.dest
        flag = _flag(action)
        if isinstance(action, argparse._AppendAction):  # --set, --train-arg: the file's first, the CLI's on top
            items = [f"{k}={_text(v)}" for k, v in value.items()] if isinstance(value, dict) else \
                (value if isinstance(value, list) else [value])
            before += [f"{flag}={_text(v)}" for v in items]
        elif dest in given:
            continue
        elif action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise ValueError(f"key {key!r} in {path} is a switch: give true or false, not {value!r}")
            after += [flag] if value else []
        elif isinstance(value, dict):
            raise ValueError(f"key {key!r} in {path} takes a value, not a mapping")
        else:  # lists join with commas (the list flags split on them); `--flag=value` never eats the next flag
            after.append(f"{flag}={','.join(map(str, value)) if isinstance(value, list) else _text(value)}")
    return before, after


def attach_config(parser: argparse.ArgumentParser) -> None:
    """Teach `parser` (the train subparser) --config: its keys fill in the flags the command line left out."""
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        # every flag unset; repeatable flags start as None (argparse appends to what is there)
        blank = argparse.Namespace(**{a.dest: None if isinstance(a, argparse._AppendAction) else _UNSET
                                      for a in parser._actions if a.dest != argparse.SUPPRESS})
        seen, _ = parse(args, blank)
        path = getattr(seen, "config", _UNSET)
        if path is _UNSET or path is None:
            return parse(args, namespace)
        given = {k for k, v in vars(seen).items() if v is not _UNSET and v is not None}
        if "model_opt" in given:
            given.add("model")
        try:
            before, after = config_flags(path, parser, given)
        except ValueError as e:
            parser.error(str(e))
        return parse(before + args + after, namespace)

    parser.parse_known_args = parse_known_args
