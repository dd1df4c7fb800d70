"""Calling a layer whose weight torch.compile cannot look inside (oneDNN's packed copy in
`decoding.FastLinear`) from a compiled graph: as one custom operator, `eager_layer`, whose body is
the layer's own eager forward. Traced as it is, the layer would compile its plain twin instead; this
way compiled and eager run the same kernel on the same bytes, and the compiler fuses what surrounds
one operator of known output shape. The operator has no gradient.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

# id(layer) -> layer, while the layer lives (a graph holds the id, not the layer).
_layers: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def register(layer: nn.Module) -> torch.Tensor:
    """Make `layer` callable from a compiled graph; returns its id as a 0-d tensor, for the layer
    to keep as a buffer."""
    _layers[id(layer)] = layer
    return torch.tensor(id(layer), dtype=torch.int64)


class OpaqueLayer(nn.Module):
    """A layer with a packed copy: the copy (`packed`, made from tensors whose `tensor_key`s are
    `packed_from`; never saved, rebuilt when they change) and the id a compiled graph calls it by.
    A deepcopy or unpickled layer is another layer: it packs its own copy and registers again."""

    def __init__(self):
        super().__init__()
        self.packed = None
        self.packed_from: tuple | None = None
        self.register_buffer("layer_id", register(self), persistent=False)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["packed"], state["packed_from"] = None, None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.layer_id = register(self).to(self.layer_id.device)


def tensor_key(t: torch.Tensor) -> tuple:
    """What changes when t is replaced or written in place (load_state_dict, `.to(...)`): its
    storage, its in-place write count and its dtype. An inference-mode tensor keeps no count (and
    cannot be written in place outside inference mode)."""
    return (t.data_ptr(), None if t.is_inference() else t._version, t.dtype)


def wanted(x: torch.Tensor) -> bool:
    """Whether a compiled layer calls `eager_layer` on x: on the CPU, with no gradient wanted."""
    return x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)


@torch.library.custom_op("tegaki::eager_layer", mutates_args=())
def eager_layer(x: torch.Tensor, weight: torch.Tensor, layer_id: torch.Tensor) -> torch.Tensor:
    """The registered layer's eager forward: (..., in) -> (..., weight.shape[0]) in x's dtype.
    `weight` shows the compiler what the output depends on; `layer_id` is a tensor, which it does
    not specialise on, so one graph serves every layer. `forward`, not the call: the graph has run
    the layer's hooks already."""
    return _layers[int(layer_id)].forward(x)


@eager_layer.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, layer_id: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
