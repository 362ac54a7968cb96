"""Layer shapes of a model without its weights (meta device), for checks and dry runs that must stay fast."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..types import LayerInfo, RankwiseError

__all__ = ["layers_of", "model_params", "targets_spec"]


def targets_spec(targets):
    """An experiment's `targets` setting (string or list) -> the select_layers spec `rankwise train` builds."""
    from ..parsing import parse_targets

    if targets is None:
        return None
    return parse_targets([targets] if isinstance(targets, str) else [str(t) for t in targets])


@lru_cache(maxsize=16)
def _skeleton_layers(model: str) -> tuple[LayerInfo, ...]:
    import torch
    from transformers import AutoConfig, AutoModel

    from ..assets import resolve_model
    from ..targets import adaptable_layers

    path = resolve_model(model)
    if not (Path(path) / "config.json").is_file():
        raise RankwiseError(f"model {model!r} is neither an alias (minilm, smollm2) nor a folder with config.json")
    try:
        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config)
    except (OSError, ValueError) as e:
        raise RankwiseError(f"could not build model {model!r}: {str(e).splitlines()[0][:160]}") from None
    return tuple(adaptable_layers(skeleton))


def layers_of(model: str, targets=None) -> list[LayerInfo]:
    """The target layers `rankwise train` will adapt on `model` (same selection rules, base model without head)."""
    from ..targets import select_layers

    return select_layers(list(_skeleton_layers(str(model))), targets_spec(targets))


@lru_cache(maxsize=16)
def model_params(model: str) -> int:
    from ..assets import resolve_model
    from ..plan import count_params

    return count_params(resolve_model(model))
