"""rankwise: decide where LoRA's rank goes."""

__version__ = "0.1.0"
