"""Multi-rank LoRA: several ranks per layer with learned coefficients, fused into two matmuls.

    from rankwise.tuners.multirank import MultiRankConfig, get_multirank_model
    model = get_multirank_model(base, MultiRankConfig(ranks=[32, 16, 8, 4, 2], target_modules=["query", "value"]))
    ...train...
    model.save_pretrained("out")             # multirank_config.json + multirank_model.safetensors
    model = load_multirank(fresh_base, "out")

`rankwise train --method multirank` trains it (method.py registers the method); `rankwise export RUN --out DIR`
writes a plain peft LoRA adapter from it, exact or SVD-compressed.
"""

from .config import MultiRankConfig, branch_scales, parse_ranks
from .layer import MultiRankLinear
from .model import HeadCopies, MultiRankModel, get_multirank_model, load_multirank

__all__ = ["MultiRankConfig", "MultiRankLinear", "MultiRankModel", "HeadCopies", "get_multirank_model",
           "load_multirank", "branch_scales", "parse_ranks"]
