"""Layers whose kernel reads a weight torch.compile cannot look inside: oneDNN's packed copy
(`decoding.FastLinear` on the "packed" path, an opaque tensor), and how a compiled graph calls them
as one operator; and when such a copy is stale.

Left to itself, torch.compile would trace the layer's plain twin instead, and the compiled step
would not multiply the way the eager one was measured to be fastest. So such a layer registers
itself here, and under compile it calls `eager_layer(x, weight, layer_id)`: one custom operator
whose body is the layer's own eager forward, run when the graph runs. The same kernel reads the
same bytes, so the layer gives the same numbers compiled and eager; the compiler sees one operator
with a known output shape, and fuses everything around it. `weight` is passed so that the compiler
knows the output depends on it (and for the output's shape); the id is a tensor (a buffer of the
layer), which the compiler does not specialise on, so one graph serves every layer of a model. The
operator has no gradient: a layer takes it only where none is wanted, and traces its readable twin
otherwise.

The packed copy is rebuilt when the tensor it was made from is replaced or written in place
(load_state_dict, `.to(...)`): `tensor_key` is what changes then.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

# id(layer) -> layer, while the layer lives (a graph holds the id, not the layer).
_layers: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def register(layer: nn.Module) -> torch.Tensor:
    """Make `layer` callable from a compiled graph; returns the id the graph will name it by, as a
    0-d tensor for the layer to keep as a buffer. Call it again for a copy (deepcopy, unpickling):
    a copy is another layer."""
    _layers[id(layer)] = layer
    return torch.tensor(id(layer), dtype=torch.int64)


class OpaqueLayer(nn.Module):
    """What a layer with a packed copy needs: the copy (`packed`, made from tensors whose
    `tensor_key`s are `packed_from`; never saved, rebuilt on need) and the id a compiled graph calls
    the layer by. A copy (deepcopy, pickling) cannot read the packed copy and is a layer of its own:
    it packs its own and registers again."""

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
    """What changes when t is replaced or written in place: its storage, its in-place write count and
    its dtype. A tensor made under torch.inference_mode keeps no count (and cannot be written in place
    outside one)."""
    return (t.data_ptr(), None if t.is_inference() else t._version, t.dtype)


def wanted(x: torch.Tensor) -> bool:
    """Under torch.compile, whether a layer should call `eager_layer` on x: on the CPU, and where no
    gradient is needed (the operator has none)."""
    return x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)


@torch.library.custom_op("tegaki::eager_layer", mutates_args=())
def eager_layer(x: torch.Tensor, weight: torch.Tensor, layer_id: torch.Tensor) -> torch.Tensor:
    """The registered layer's eager forward on x: (..., in) -> (..., out = weight.shape[0]), in x's
    dtype. `forward`, not the call: the compiled graph has run the layer's hooks already."""
    return _layers[int(layer_id)].forward(x)


@eager_layer.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, layer_id: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
