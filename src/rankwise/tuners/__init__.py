"""Adapters that are not plain peft LoRA, each in its own small package (`multirank`), each exportable to plain
peft LoRA through `rankwise export`."""

__all__: list[str] = []
