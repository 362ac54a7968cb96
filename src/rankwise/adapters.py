"""Several trained runs on one base model: load them by name, switch, run a batch through each, combine, delete.

    from rankwise.adapters import load_adapters
    ads = load_adapters({"sst2": "runs/sst2", "news": "runs/news"})
    ads.use("news"); ads.predict(["Stocks fell"])             # the active adapter, with its own head and labels
    ads.predict_each(["Stocks fell"])                          # {name: rows}, every adapter in turn
    ads.combine("mix", {"sst2": 0.5, "news": 0.5}, how="cat")  # peft's add_weighted_adapter (cat is exact)
    ads.delete("mix")

Every method's run becomes a plain peft LoRA adapter through its own `to_lora` (plain LoRA runs load with peft's
`load_adapter(..., adapter_name=...)` directly). Runs trained on different label sets keep their own heads: peft
keeps one copy of each `modules_to_save` module per adapter, and a head whose saved shape differs from the base's
(2 vs 4 classes) gets a copy of that shape before the weights load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .types import RankwiseError

__all__ = ["COMBINATIONS", "Adapters", "load_adapters", "parse_adapters"]

# exact: cat (ranks add up, a weighted sum of the deltas); svd: the same sum truncated by SVD to svd_rank
# (exact when svd_rank >= the summed ranks of a layer); linear: weighted averages of A and of B separately, which
# is not the sum of the deltas (cross terms), and needs equal ranks in every layer.
COMBINATIONS = ("cat", "svd", "linear")
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


def parse_adapters(spec: str | Sequence[str]) -> dict[str, str]:
    """`"sst2=runs/a,news=runs/b"` (or a list of `name=dir`) -> {name: run folder}, names unique."""
    items = [spec] if isinstance(spec, str) else list(spec)
    pairs = [p.strip() for raw in items for p in raw.split(",") if p.strip()]
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, run = pair.partition("=")
        if not sep or not name or not run:
            raise RankwiseError(f"--adapters expects NAME=RUN_DIR[,NAME=RUN_DIR...], got {pair!r}")
        if name in out:
            raise RankwiseError(f"adapter name {name!r} is given twice in --adapters")
        out[name] = run
    if not out:
        raise RankwiseError("--adapters needs at least one NAME=RUN_DIR")
    return out


@dataclass
class _Run:
    run_dir: str
    task: dict  # task.json
    info: object  # DataInfo: columns, label map
    tokenizer: object


def _fingerprint(path: str) -> str:
    """What makes two base folders the same model: the architecture config and the weight files' bytes."""
    p = Path(path)
    h = hashlib.sha256()
    config = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    for key in ("_name_or_path", "architectures", "id2label", "label2id", "num_labels", "problem_type",
                "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)  # the head and bookkeeping, not the base weights
    h.update(json.dumps(config, sort_keys=True).encode())
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def _check_same_base(runs: Mapping[str, _Run]) -> str:
    """The one base model every run was trained on; a clear error naming two runs that differ."""
    from .training.runs import _base_path

    paths = {name: _base_path(r.task) for name, r in runs.items()}
    first = next(iter(paths))
    tasks = {r.task["task"] for r in runs.values()}
    if len(tasks) > 1:
        raise RankwiseError(f"adapters mix tasks {sorted(tasks)}; several adapters on one model need one task "
                            "(all seq-cls or all causal-lm)")
    prints: dict[str, str] = {}
    for name, path in paths.items():
        if path == paths[first] or (Path(path).exists() and Path(path).resolve() == Path(paths[first]).resolve()):
            continue
        for n in (first, name):
            if n not in prints:
                prints[n] = _fingerprint(paths[n]) if Path(paths[n]).is_dir() else paths[n]
        if prints[name] != prints[first]:
            raise RankwiseError(f"adapters {first!r} and {name!r} were trained on different base models "
                                f"({paths[first]} vs {path}); several adapters must share one base model")
    return paths[first]


def _head_shapes(run_dir: str, tensors: dict | None = None) -> dict[str, tuple]:
    """{saved key: shape} of a run's adapter file, read from the safetensors header when not given."""
    if tensors is not None:
        return {k: tuple(v.shape) for k, v in tensors.items()}
    from safetensors import safe_open

    with safe_open(str(Path(run_dir) / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _fit_heads(model, name: str, shapes: dict[str, tuple]) -> None:
    """Give adapter `name` its own copy of every trained head, shaped as saved (its label count), so peft loads
    the weights into it instead of failing on a copy of the base's head."""
    from peft.utils import ModulesToSaveWrapper

    for path, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or name in wrapper.modules_to_save:
            continue
        head = copy.deepcopy(wrapper.original_module)
        changed = False
        for mname, owner in list(head.named_modules()):  # each parameter with the module that owns it
            for pname, param in list(owner.named_parameters(recurse=False)):
                shape = shapes.get(f"{path}.{mname}.{pname}" if mname else f"{path}.{pname}")
                if shape is None or tuple(param.shape) == shape:
                    continue
                if isinstance(owner, torch.nn.Linear) and param is owner.weight:
                    owner.out_features, owner.in_features = shape
                setattr(owner, pname, torch.nn.Parameter(param.new_zeros(shape)))
                changed = True
        if changed:
            wrapper.modules_to_save[name] = head


class Adapters:
    """A PeftModel holding several named adapters, each with its run's tokenizer, task and label map."""

    def __init__(self, model, runs: dict[str, _Run], device: str):
        self.model, self.runs, self.device = model, runs, device

    @property
    def names(self) -> list[str]:
        return list(self.runs)

    @property
    def active(self) -> str:
        return self.model.active_adapter

    def _check(self, name: str) -> _Run:
        if name not in self.runs:
            raise RankwiseError(f"no adapter named {name!r}; loaded: {', '.join(self.runs)}")
        return self.runs[name]

    def add(self, name: str, run_dir: str | os.PathLike) -> None:
        """Load another run folder as adapter `name` (same base model and task as the others)."""
        if name in self.runs:
            raise RankwiseError(f"an adapter named {name!r} is already loaded")
        run = _read_run(name, run_dir)
        _check_same_base({**self.runs, name: run})
        _attach(self.model, name, run)
        self.runs[name] = run
        self.model.to(self.device)

    def use(self, name: str) -> None:
        """Make `name` the active adapter (its LoRA layers and its head)."""
        self._check(name)
        self.model.set_adapter(name)
        self.model.eval()

    def forward(self, name: str, **batch):
        """The model's output for one batch of tensors through adapter `name` (the active one is restored)."""
        self._check(name)
        before = self.active
        try:
            self.use(name)
            with torch.no_grad():
                return self.model(**{k: v.to(self.device) for k, v in batch.items()})
        finally:
            self.use(before)

    def run_each(self, **batch) -> dict[str, torch.Tensor]:
        """{name: logits} of one batch through every adapter in turn."""
        return {name: self.forward(name, **batch).logits for name in self.runs}

    def predict(self, texts: Sequence[str] | str, name: str | None = None, *, text_pairs=None,
                max_new_tokens: int = 64) -> list[dict]:
        """`rankwise predict` rows through adapter `name` (default: the active one), with its own label map."""
        from .training.runs import predict_with

        name = name or self.active
        run = self._check(name)
        texts = [texts] if isinstance(texts, str) else list(texts)
        before = self.active
        try:
            self.use(name)
            return predict_with(self.model, run.tokenizer, run.task, run.info, texts, text_pairs=text_pairs,
                                max_new_tokens=max_new_tokens, device=self.device)
        finally:
            self.use(before)

    def predict_each(self, texts: Sequence[str] | str, **kwargs) -> dict[str, list[dict]]:
        return {name: self.predict(texts, name, **kwargs) for name in self.runs}

    def combine(self, name: str, weights: Mapping[str, float], *, how: str = "cat", svd_rank: int | None = None,
                head: str | None = None) -> None:
        """Add adapter `name` = sum of weight * adapter (peft's add_weighted_adapter). `how`: cat (exact),
        svd (the exact sum truncated to `svd_rank`), linear (A and B averaged apart; equal ranks only).
        Classifier runs: the combined adapter uses the head and label map of `head` (default the first)."""
        if name in self.runs:
            raise RankwiseError(f"an adapter named {name!r} is already loaded")
        if not _NAME_RE.fullmatch(name):
            raise RankwiseError(f"adapter name {name!r}: use letters, digits, '_' and '-'")
        if how not in COMBINATIONS:
            raise RankwiseError(f"unknown combination {how!r}; use one of {', '.join(COMBINATIONS)}")
        if not weights:
            raise RankwiseError("give at least one adapter weight to combine")
        for a in weights:
            self._check(a)
        head = head or next(iter(weights))
        self._check(head)
        configs = [self.model.peft_config[a] for a in weights]
        if any(getattr(c, "use_dora", False) for c in configs):
            raise RankwiseError("DoRA adapters cannot be combined (peft's weighted merge ignores their magnitudes)")
        if how == "linear":
            if any(float(w) < 0 for w in weights.values()):
                raise RankwiseError("combination 'linear' takes square roots of the weights: give weights >= 0, "
                                    "or use how='cat' (exact, negative weights allowed)")
            _check_equal_ranks(self.model, list(weights))
        before = self.active
        self.use(head)  # peft re-activates the active adapter's head while it builds the new adapter
        with _heads_hidden(self.model, [a for a in weights if a != head]):
            self.model.add_weighted_adapter(list(weights), [float(w) for w in weights.values()], name,
                                            combination_type=how, svd_rank=svd_rank)
        _fix_combined(self.model, name, head)
        self.use(before)
        self.runs[name] = self.runs[head]
        self.model.to(self.device)

    def delete(self, name: str) -> None:
        """Remove adapter `name` (its LoRA weights and head); the active adapter moves to another one."""
        self._check(name)
        if len(self.runs) == 1:
            raise RankwiseError(f"{name!r} is the only adapter loaded; nothing would be left to run")
        if self.active == name:
            self.use(next(n for n in self.runs if n != name))
        self.model.delete_adapter(name)
        del self.runs[name]


def _read_run(name: str, run_dir) -> _Run:
    from .training.data import DataInfo
    from .training.runs import load_run
    from .training.tasks import load_tokenizer

    if not _NAME_RE.fullmatch(name):
        raise RankwiseError(f"adapter name {name!r}: use letters, digits, '_' and '-'")
    task = load_run(run_dir)
    return _Run(str(run_dir), task, DataInfo.from_dict(task["data"]), load_tokenizer(str(run_dir)))


def _attach(model, name: str, run: _Run):
    """Put run `run` on `model` (a PeftModel, or the bare base model for the first run) as adapter `name`."""
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    from .methods import method_of_run

    method = method_of_run(run.run_dir)
    plain = None if method.name == "lora" else method.to_lora(run.run_dir)
    if not isinstance(model, PeftModel):
        if plain is None:
            return PeftModel.from_pretrained(model, run.run_dir, adapter_name=name)
        model = get_peft_model(model, plain.config, adapter_name=name)
    else:
        _fit_heads(model, name, _head_shapes(run.run_dir, None if plain is None else plain.tensors))
        if plain is None:
            model.load_adapter(run.run_dir, adapter_name=name)
            return model
        model.add_adapter(name, plain.config)
    result = set_peft_model_state_dict(model, plain.tensors, adapter_name=name)
    if result.unexpected_keys:
        raise RankwiseError(f"{run.run_dir}: {len(result.unexpected_keys)} saved tensors matched no layer of the "
                            f"base model (e.g. {result.unexpected_keys[0]})")
    return model


def _check_equal_ranks(model, names: list[str]) -> None:
    from .apply import lora_layers

    ranks = [{k: v[0] for k, v in lora_layers(model, n).items()} for n in names]
    if any(r != ranks[0] for r in ranks[1:]):
        raise RankwiseError("combination 'linear' needs the same layers at the same ranks in every adapter; these "
                            "adapters differ (use how='cat', exact for any ranks)")


class _heads_hidden:
    """peft refuses to combine adapters that each train a head; the combined adapter takes one head anyway, so
    the other adapters' head copies step aside while peft merges the LoRA layers."""

    def __init__(self, model, names: list[str]):
        from peft.utils import ModulesToSaveWrapper

        self.wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
        self.names, self.saved = names, []

    def __enter__(self):
        for w in self.wrappers:
            self.saved.append({n: w.modules_to_save.pop(n) for n in self.names if n in w.modules_to_save})

    def __exit__(self, *exc):
        for w, heads in zip(self.wrappers, self.saved):
            for n, m in heads.items():
                w.modules_to_save[n] = m


def _fix_combined(model, name: str, head: str) -> None:
    """The combined adapter: scaling 1 (peft folds the weights and scalings into A and B; an inherited rsLoRA
    flag would rescale by sqrt(r)), and a copy of `head`'s trained head."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    model.peft_config[name].use_rslora = False
    for m in model.modules():
        if isinstance(m, LoraLayer) and name in m.scaling:
            m.scaling[name] = 1.0
        if isinstance(m, ModulesToSaveWrapper) and head in m.modules_to_save:
            m.modules_to_save[name] = copy.deepcopy(m.modules_to_save[head])


def load_adapters(runs: Mapping[str, str | os.PathLike] | str | Sequence[str], *, device: str = "cpu") -> Adapters:
    """Load run folders onto one base model as named adapters; the first one is active.

    `runs`: {name: run folder} or "name=dir,name=dir". All must share one base model (folder or identical weights)
    and one task. The base loads in full precision, also for QLoRA runs."""
    from .training.prepare import pick_device, quiet_libraries
    from .training.runs import restores_head
    from .training.tasks import load_model

    dev = pick_device(device)  # before any loading: a bad --device fails at once
    mapping = parse_adapters(runs) if isinstance(runs, (str, list, tuple)) else dict(runs)
    if not mapping:
        raise RankwiseError("give at least one adapter: {name: run folder}")
    read = {name: _read_run(name, d) for name, d in mapping.items()}
    base_path = _check_same_base(read)
    first = next(iter(read.values()))
    # every adapter brings its own head: the base's "newly initialized" head report would be a false alarm
    with quiet_libraries(not all(restores_head(r.task) for r in read.values())):
        model = load_model(base_path, first.task["task"], first.info)
    from .training.runs import check_run_base

    for run in read.values():  # the base folder still holds the model every run was trained on
        check_run_base(model, run.run_dir)
    for name, run in read.items():
        model = _attach(model, name, run)
    ads = Adapters(model.to(dev), read, dev)
    ads.use(next(iter(read)))
    return ads
