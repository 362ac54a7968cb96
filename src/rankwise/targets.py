"""Which layers get LoRA: resolve user target specs to fully qualified names, and write peft pattern keys.

Everything downstream works on fully qualified module names (`encoder.layer.0.attention.output.dense`), never on
suffixes, because suffixes collide: in BERT `output.dense` is both the attention output and the FFN output.
`pattern_key` is the one place that turns a name into a peft `rank_pattern`/`alpha_pattern` key.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from torch import nn

from .types import LayerInfo, RankwiseError

__all__ = [
    "ALL_LINEAR",
    "HEAD_NAMES",
    "adaptable_layers",
    "resolve_targets",
    "select_layers",
    "pattern_key",
    "peft_patterns",
    "match_names",
    "module_type_of",
    "depth_of",
]

ALL_LINEAR = "all-linear"
# Output heads are never adapted by "all-linear": they are new (classifier) or tied to embeddings (lm_head).
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "pooler", "cls", "embed_out"})
_ATTN_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "intermediate", "feed_forward", "feedforward")
_MLP_LEAVES = frozenset({"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3", "wi", "wo"})
_DEPTH_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def module_type_of(name: str) -> str:
    """'attention', 'mlp' or 'other', from the module path (BERT's FFN output is `layer.N.output.dense`)."""
    parts = name.split(".")
    if any(w in p for p in parts for w in _ATTN_WORDS):
        return "attention"
    if any(w in p for p in parts for w in _MLP_WORDS) or parts[-1] in _MLP_LEAVES:
        return "mlp"
    if len(parts) >= 2 and parts[-2] == "output" and parts[-1] == "dense":
        return "mlp"
    return "other"


def depth_of(name: str) -> int | None:
    """Index of the transformer block: the first integer path component, if any."""
    m = _DEPTH_RE.search(name)
    return int(m.group(1)) if m else None


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return ()
    return (Conv1D,)


def adaptable_layers(model: nn.Module) -> list[LayerInfo]:
    """Every nn.Linear and GPT-2 Conv1D in `model`, in module order, with shapes as [out, in]."""
    conv1d = _conv1d_type()
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            out_f, in_f, kind = mod.out_features, mod.in_features, "linear"
        elif conv1d and isinstance(mod, conv1d):
            in_f, out_f = mod.weight.shape  # Conv1D stores the weight as [in, out]
            kind = "conv1d"
        else:
            continue
        layers.append(LayerInfo(name, int(out_f), int(in_f), kind, module_type_of(name), depth_of(name)))
    return layers


def _is_head(name: str, head_names: Iterable[str]) -> bool:
    heads = set(head_names)
    return any(p in heads for p in name.split("."))


def _describe(layers: Sequence[LayerInfo]) -> str:
    """Adaptable names with block indices folded to N, so a 30-layer model lists a handful of patterns."""
    seen: dict[str, None] = {}
    for layer in layers:
        seen[_DEPTH_RE.sub(lambda m: m.group(0).replace(m.group(1), "N"), layer.name)] = None
    return ", ".join(seen) or "none"


def select_layers(
    layers: Sequence[LayerInfo],
    targets: str | Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    head_names: Iterable[str] = HEAD_NAMES,
) -> list[LayerInfo]:
    """Filter candidate layers with peft's semantics.

    - None or "all-linear": every candidate except output heads/classifiers.
    - a list of names: a layer matches a name exactly or ends with "." + name (so `query` and
      `attention.self.query` both work), as in peft's `target_modules` list.
    - any other single string: a regex that must match the whole name (peft's `target_modules` string).
    """
    if targets is None or targets == ALL_LINEAR or (not isinstance(targets, str) and list(targets) == [ALL_LINEAR]):
        chosen = [lay for lay in layers if not _is_head(lay.name, head_names)]
    elif isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise RankwiseError(f"targets regex {targets!r} is invalid: {e}") from None
        chosen = [lay for lay in layers if rx.fullmatch(lay.name)]
    else:
        wanted = [t.strip() for t in targets if t.strip()]
        if not wanted:
            raise RankwiseError("targets is an empty list; give module names, a regex, or 'all-linear'")
        chosen = [lay for lay in layers if any(lay.name == t or lay.name.endswith("." + t) for t in wanted)]
    if exclude:
        chosen = [lay for lay in chosen if not any(lay.name == e or lay.name.endswith("." + e) for e in exclude)]
    if not chosen:
        raise RankwiseError(
            f"targets {targets!r} match no adaptable (Linear/Conv1D) module; the model has: {_describe(layers)}"
        )
    return chosen


def resolve_targets(model: nn.Module, targets: str | Sequence[str] | None = None, **kw) -> list[LayerInfo]:
    """Fully qualified LayerInfo for every module of `model` that `targets` selects (see `select_layers`)."""
    return select_layers(adaptable_layers(model), targets, **kw)


def pattern_key(name: str) -> str:
    """The peft rank_pattern/alpha_pattern key for one fully qualified module name.

    peft matches keys with `re.match(rf"(.*\\.)?({key})$", module_name)`: escaping makes dots literal, and a fully
    qualified name can then only match itself (or itself under a wrapper prefix such as `bert.` or
    `base_model.model.`), never a sibling like `attention.output.dense` vs `output.dense`.
    """
    return re.escape(name)


def peft_patterns(values: dict[str, float | int]) -> dict[str, float | int]:
    """{module name: value} -> {pattern_key: value}, the form LoraConfig's rank_pattern/alpha_pattern take."""
    return {pattern_key(name): value for name, value in values.items()}


def match_names(plan_names: Iterable[str], model_names: Iterable[str]) -> dict[str, str]:
    """Map each plan layer name to the one model module whose name equals it or ends with "." + it.

    A plan made on a bare encoder (`encoder.layer.0...`) applies to the same encoder under a task head
    (`bert.encoder.layer.0...`). Names with no match or several matches are errors naming the fix.
    """
    model_names = list(model_names)
    mapping, missing, ambiguous = {}, [], []
    for name in plan_names:
        hits = [m for m in model_names if m == name or m.endswith("." + name)]
        if len(hits) == 1:
            mapping[name] = hits[0]
        elif not hits:
            missing.append(name)
        else:
            ambiguous.append(f"{name} -> {hits[:3]}")
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise RankwiseError(
            f"plan layers not found in this model: {shown}; the plan was made for another model "
            "(re-run `rankwise plan` on this model)"
        )
    if ambiguous:
        raise RankwiseError(f"plan layer names match several modules: {'; '.join(ambiguous[:3])}")
    return mapping
