"""Preparing a loaded model for decoding on a CPU: wide matrices stored the way one token reads them.

Decoding one token multiplies one vector by every weight matrix; the largest is the LM head (GPT-2:
50,257 x 768, 154 MB in float32). nn.Linear keeps a weight as (out, in), row after row; for a single
vector and out >= in, CPU BLAS streams the transposed copy, (in, out) row after row, faster (1.7x
for GPT-2's head on the 2-core AVX-512 machine of benchmarks/RESULTS.md, 20-40% for q/k/v and the
MLP's up projection on an AVX2 one; narrower outputs gain nothing).

`prepare_for_decoding(model)` swaps those layers for `DecodingHead`s, which hold that copy: same
values, same logits (tests/test_decoding.py). It is applied from outside, once, by the code that decodes --
`tegaki generate`, `tegaki serve`, `generate(..., prepare=True)` -- and it is one way: the copy is not a
parameter, so the prepared model refuses to train (a tied head would otherwise drift from the
embedding it copies). Reload the model to train it. A tied head costs one more copy of the
embedding's memory.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tegaki.errors import TegakiError


class DecodingHead(nn.Module):
    """y = x @ W^T with W^T stored contiguously: nn.Linear's output, read in the faster order."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.register_buffer("weight_t", linear.weight.detach().t().contiguous())  # (C, V)
            bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weight_t.t() is W as a (V, C) view over the transposed storage: nn.Linear's own call,
        # which hands BLAS the layout it streams fastest for one row of x.
        return F.linear(x, self.weight_t.t(), self.bias)  # (..., C) -> (..., V)

    def train(self, mode: bool = True):
        if mode:
            raise TegakiError(
                "this model was prepared for decoding (its LM head is a copy for reading, not a parameter); "
                "load it again to train it"
            )
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, stored transposed for decoding"


def prepare_for_decoding(model: nn.Module) -> nn.Module:
    """Swap every float32 nn.Linear on the CPU whose output is at least as wide as its input (the
    LM head, q/k/v, the MLP's up projection) for a DecodingHead: the fixed rule of
    benchmarks/RESULTS.md, where those streamed faster transposed and the others did not. Quantized
    layers and GPU layers are left as they are. In place; returns the model, in eval mode."""
    for name, module in list(model.named_modules()):
        if (
            isinstance(module, nn.Linear)
            and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu"
            and module.out_features >= module.in_features
        ):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, DecodingHead(module))
    return model.eval()
