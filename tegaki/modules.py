"""Swapping one submodule of a model for another: how the speed layer, quantization and LoRA put their
layers where a model's nn.Linear layers were (and put them back)."""

from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the submodule `name` (a dotted path such as "blocks.0.attn.qkv") is, in place;
    return the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
