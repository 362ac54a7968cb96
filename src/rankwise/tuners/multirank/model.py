"""`get_multirank_model(model, config)`: the public entry point, and the wrapper it returns.

Why not `peft.get_peft_model`: peft's `register_peft_method` only accepts names that are already members of its
closed `PeftType` enum, and an unknown `peft_type` in adapter_config.json fails to load; the experimental
`LoraConfig._register_custom_module` would save a folder typed LORA that plain peft then loads as ordinary LoRA,
silently dropping the coefficients. So the multi-rank adapter is rankwise's own small wrapper with peft's everyday
methods, saved under its own file names (a plain `PeftModel.from_pretrained` on it fails loudly), and turned into
plain peft LoRA by `rankwise export`.
"""

from __future__ import annotations

import copy
import inspect
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ...targets import resolve_targets
from ...types import RankwiseError
from .config import CONFIG_NAME, WEIGHTS_NAME, MultiRankConfig
from .layer import MultiRankLinear

__all__ = ["MultiRankModel", "HeadCopies", "get_multirank_model", "load_multirank"]

_PARTS = ("multirank_A", "multirank_B", "multirank_coefficients")


class HeadCopies(nn.Module):
    """A `modules_to_save` module (task head): one trainable copy per adapter, the frozen original when disabled."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original_module)
        if self.active_adapter is None:
            self.set_adapter(name)

    def set_adapter(self, name: str) -> None:
        self.active_adapter = name  # not among the copies: the original runs
        for n, mod in self.copies.items():
            mod.requires_grad_(n == name)

    def forward(self, *args, **kwargs):
        if self.disabled or self.active_adapter not in self.copies:
            return self.original_module(*args, **kwargs)
        return self.copies[self.active_adapter](*args, **kwargs)


def _matches(name: str, keys) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys or ())


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _check_name(name: str) -> None:
    if not name or not name.isidentifier():
        raise RankwiseError(f"adapter names are Python identifiers (letters, digits, _), got {name!r}")


class MultiRankModel(nn.Module):
    """The adapted model. Attribute access falls through to the wrapped model (config, generate, ...)."""

    def __init__(self, model: nn.Module, config: MultiRankConfig | None, adapter_name: str = "default",
                 generator: torch.Generator | None = None):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, MultiRankConfig] = {}
        self.active_adapter = adapter_name
        for p in model.parameters():
            p.requires_grad_(False)
        if config is not None:  # None: an empty wrapper that load_adapter fills
            self.add_adapter(adapter_name, config, generator=generator)
            self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """What the Trainer would read off the wrapped model (our forward's **kwargs would mislead it)."""
        if hasattr(self.model, "accepts_loss_kwargs"):
            return bool(self.model.accepts_loss_kwargs)
        params = inspect.signature(self.model.forward).parameters.values()
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ----- adapters ----------------------------------------------------------------------------------------
    def multirank_layers(self) -> dict[str, MultiRankLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MultiRankLinear)}

    def head_modules(self) -> dict[str, HeadCopies]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, HeadCopies)}

    def add_adapter(self, adapter_name: str, config: MultiRankConfig,
                    generator: torch.Generator | None = None) -> None:
        """Add a named adapter (frozen until `set_adapter`). Targets resolve as peft's target_modules do, on the
        model as it was before wrapping, so a second adapter may target the same or other layers."""
        _check_name(adapter_name)
        if adapter_name in self.peft_config:
            raise RankwiseError(f"adapter {adapter_name!r} already exists; choose another name")
        view = _BaseView(self.model)
        base_mods = dict(view.named_modules())
        for info in resolve_targets(view, config.target_modules):
            layer = self.model.get_submodule(info.name)
            if not isinstance(layer, MultiRankLinear):
                layer = MultiRankLinear(base_mods[info.name])
                _replace(self.model, info.name, layer)
            ranks = config.ranks_for(info.name)
            layer.add_adapter(adapter_name, ranks, config.alpha_for(ranks), config.scaling, config.coefficient_init,
                              config.lora_dropout, generator)
            layer.set_adapter(self.active_adapter)  # a new adapter stays frozen until set_adapter
        heads: list[str] = []
        for name, mod in base_mods.items():
            if not name or not _matches(name, config.modules_to_save) or any(name.startswith(h + ".") for h in heads):
                continue
            heads.append(name)
            head = self.model.get_submodule(name)
            if not isinstance(head, HeadCopies):
                if any(isinstance(m, MultiRankLinear) for m in head.modules()):
                    raise RankwiseError(f"module {name!r} is both a target and in modules_to_save; choose one")
                head = HeadCopies(mod)
                _replace(self.model, name, head)
            head.add_adapter(adapter_name)
            head.set_adapter(self.active_adapter)
        self.peft_config[adapter_name] = config

    def set_adapter(self, adapter_name: str) -> None:
        """Route every layer and head through `adapter_name`; only its parameters are trainable."""
        if adapter_name not in self.peft_config:
            raise RankwiseError(f"no adapter {adapter_name!r}; this model has {sorted(self.peft_config)}")
        for mod in [*self.multirank_layers().values(), *self.head_modules().values()]:
            mod.set_adapter(adapter_name)
        self.active_adapter = adapter_name

    @contextmanager
    def disable_adapter(self):
        """Run the base model (original heads included) inside the block; merged weights are unmerged first."""
        mods = [*self.multirank_layers().values(), *self.head_modules().values()]
        try:
            for m in mods:
                m.disabled = True
            yield
        finally:
            for m in mods:
                m.disabled = False

    # ----- merge -------------------------------------------------------------------------------------------
    def merge_adapter(self) -> None:
        for layer in self.multirank_layers().values():
            layer.merge(self.active_adapter)

    def unmerge(self) -> None:
        for layer in self.multirank_layers().values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapter into the base weights and return the plain model (heads: the active copy)."""
        name = self.active_adapter
        for lname, layer in self.multirank_layers().items():
            layer.merge(name)
            _replace(self.model, lname, layer.base_layer)
        for hname, head in self.head_modules().items():
            _replace(self.model, hname, head.copies[name] if name in head.copies else head.original_module)
        model = self.model
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def get_base_model(self) -> nn.Module:
        return self.model

    # ----- parameters --------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters, head copies included in both (as peft counts them)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def adapter_parameters(self, adapter_name: str | None = None) -> int:
        """Multi-rank parameters of one adapter (A, B and coefficients), heads excluded: the budget's unit."""
        name = adapter_name or self.active_adapter
        return sum(getattr(layer, part)[name].numel() for layer in self.multirank_layers().values()
                   for part in _PARTS if name in layer.multirank_A)

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # ----- files -------------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """`<module>.multirank_A|multirank_B|multirank_coefficients` and `<head>.<param>`, module names as in
        the wrapped model before wrapping."""
        name = adapter_name or self.active_adapter
        out = {}
        for lname, layer in self.multirank_layers().items():
            if name in layer.multirank_A:
                for part in _PARTS:
                    out[f"{lname}.{part}"] = getattr(layer, part)[name].detach()
        for hname, head in self.head_modules().items():
            if name in head.copies:
                for k, v in head.copies[name].state_dict().items():
                    out[f"{hname}.{k}"] = v.detach()
        return out

    def resolved_config(self, adapter_name: str | None = None) -> MultiRankConfig:
        """The adapter's config with what it resolved to: full target names, every layer's ranks, head names."""
        name = adapter_name or self.active_adapter
        config = copy.deepcopy(self.peft_config[name])
        layers = {n: lay for n, lay in self.multirank_layers().items() if name in lay.ranks}
        config.target_modules = sorted(layers)
        config.rank_pattern = {n: lay.ranks[name] for n, lay in sorted(layers.items())}
        config.modules_to_save = sorted(n for n, h in self.head_modules().items() if name in h.copies) or None
        config.fan_in_fan_out = any(lay.fan_in_fan_out for lay in layers.values())
        return config

    def save_pretrained(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
        """multirank_config.json (resolved per-layer ranks) + multirank_model.safetensors for one adapter."""
        from safetensors.torch import save_file

        name = adapter_name or self.active_adapter
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.resolved_config(name).save(out)
        tensors = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict(name).items()}
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "adapter": name})
        return out

    def load_adapter(self, folder: str | os.PathLike, adapter_name: str = "default") -> None:
        """Add the adapter saved in `folder` under `adapter_name` and make it active."""
        from safetensors.torch import load_file

        config = MultiRankConfig.from_pretrained(folder)
        weights = Path(folder) / WEIGHTS_NAME
        if not weights.is_file():
            raise RankwiseError(f"{folder} has no {WEIGHTS_NAME}; the adapter folder is incomplete")
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)
        _load_tensors(self, load_file(str(weights)), adapter_name, folder)


class _BaseView(nn.Module):
    """The wrapped model as it was before wrapping: MultiRankLinear/HeadCopies shown as their base modules,
    so targets resolve to the same names for a second adapter."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_m", model)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        skip: list[str] = []
        for name, mod in self._m.named_modules():
            if any(name == s or name.startswith(s + ".") for s in skip):
                continue
            if isinstance(mod, MultiRankLinear):
                skip.append(name)
                yield name, mod.base_layer
            elif isinstance(mod, HeadCopies):
                skip.append(name)
                yield name, mod.original_module
            else:
                yield name, mod


def _load_tensors(model: MultiRankModel, tensors: dict, name: str, where) -> None:
    """Copy saved tensors into adapter `name`; every expected tensor must be there with its exact shape."""
    expected = model.adapter_state_dict(name)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise RankwiseError(f"{where} does not match this model: missing {missing[:2]}, unexpected {extra[:2]} "
                            "(was it trained on another base model?)")
    bad = [k for k, v in tensors.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise RankwiseError(f"{where}: tensor {bad[0]} has shape {list(tensors[bad[0]].shape)}, the model needs "
                            f"{list(expected[bad[0]].shape)}")
    with torch.no_grad():
        for lname, layer in model.multirank_layers().items():
            for part in _PARTS if name in layer.multirank_A else ():
                getattr(layer, part)[name].copy_(tensors[f"{lname}.{part}"])
        for hname, head in model.head_modules().items():
            if name in head.copies:
                sub = {k[len(hname) + 1:]: v for k, v in tensors.items() if k.startswith(hname + ".")}
                head.copies[name].load_state_dict(sub, strict=True)


def get_multirank_model(model: nn.Module, config: MultiRankConfig, adapter_name: str = "default",
                        generator: torch.Generator | None = None) -> MultiRankModel:
    """Freeze `model`, replace its target modules by MultiRankLinear, keep `modules_to_save` trainable."""
    return MultiRankModel(model, config, adapter_name, generator=generator)


def load_multirank(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> MultiRankModel:
    """The adapter saved in `folder` on `model`, exactly as saved, in eval mode."""
    wrapped = MultiRankModel(model, None, adapter_name)
    wrapped.load_adapter(folder, adapter_name)
    return wrapped.eval()
