"""Decoding on a CPU: the linear layers multiplied by oneDNN's kernels, in the layout they read best.

Decoding one token multiplies one vector by every weight matrix, so its time is the time to stream
every weight from memory once. In float32 nn.Linear hands W (out, in) to MKL's general matmul, which
on the CPU measured reads it at about half the speed memory allows when there is one row to multiply.
oneDNN (PyTorch's CPU kernel library, "mkldnn") has kernels written for this case, called through
`torch.ops.mkldnn._linear_pointwise`; given a weight in the layout oneDNN asks for
(`torch.ops.mkldnn._reorder_linear_weight`, "packing"), they halve the matmul time of a GPT-2 124M
decode step in float32 and in bfloat16 (benchmarks/RESULTS.md). The values, and so the logits, are
those of nn.Linear up to the order of the additions (tests/test_decoding.py).

What that layout is depends on the dtype and the CPU. For float32 on the AVX-512 CPU measured (and
with oneDNN held to AVX2 there) it is W's own: row after row, the bytes nn.Linear holds. Then the
kernel reads W where it is and no copy is made. For bfloat16 it is re-blocked into tiles (a copy of
the weight, made once and made again if the weight changes). `layout_is_own` asks oneDNN once per
shape and dtype, by packing one weight and comparing the bytes.

`PackedLinear` is that layer; it keeps the original weight (the readable twin, `forward_reference`,
and what `state_dict` saves). Two ways to use it, both module swaps from outside the model:

- `decoding_layout(model)`: for the length of a `with` block, then the model is as it was. This is
  what `generate` does by default, so `model.generate(...)` is fast without a flag.
- `prepare_for_decoding(model)`: once and for good, for code that only decodes (`tegaki generate`,
  `tegaki serve`). A prepared model refuses to train: reload it to train it.

Under torch.compile a layer given one float32 row (a decode step) takes `forward_matvec` instead: the
product written as dot products, which inductor compiles into a loop that reads the plain weight
faster still; any other input calls the oneDNN kernel as one operator of the graph (opaque.py).

Layers are swapped only where oneDNN serves them: float32 (and bfloat16 where the CPU multiplies it
in hardware) on the CPU. Quantized layers and GPU layers are left as they are.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from tegaki import opaque
from tegaki.errors import TegakiError


def bf16_matmul_in_hardware() -> bool:
    """oneDNN multiplies bfloat16 natively (AVX-512 BF16 or AMX); elsewhere it is emulated, slowly."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packable(linear: nn.Module) -> bool:
    """An nn.Linear that oneDNN's packed kernels serve on this machine."""
    if not isinstance(linear, nn.Linear) or not torch.backends.mkldnn.is_available():
        return False
    w = linear.weight
    if w.device.type != "cpu":
        return False
    return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and bf16_matmul_in_hardware())


# (shape, dtype) -> whether oneDNN's layout for a one-row product is the weight's own (layout_is_own).
_own_layout: dict[tuple[torch.Size, torch.dtype], bool] = {}


def same_bytes(packed: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's packed tensor holds exactly the bytes of `weight`, in the same order. The
    packed tensor is opaque: its bytes are read where oneDNN keeps them (as inductor reads them to
    save such a tensor), without a copy."""
    n = torch.ops.mkldnn._nbytes(packed)
    if n != weight.nbytes or not weight.is_contiguous():
        return False
    raw = (ctypes.c_ubyte * n).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.equal(torch.frombuffer(raw, dtype=torch.uint8), weight.reshape(-1).view(torch.uint8))


def layout_is_own(weight: torch.Tensor) -> bool:
    """Whether oneDNN's kernel for one row reads this weight in its own (out, in) row-major layout,
    so that packing it would only copy it. Asked once per shape and dtype in a process: one weight is
    packed and its bytes compared. A weight that reads alike in more than one order (a constant
    matrix, a symmetric one) cannot tell, so a random one of its shape is asked instead."""
    if not weight.is_contiguous() or weight.numel() == 0:
        return False
    key = (weight.shape, weight.dtype)
    if key not in _own_layout:
        probe = weight
        if bool(weight.amin() == weight.amax()) or (
            weight.shape[0] == weight.shape[1] and torch.equal(weight, weight.t())
        ):
            probe = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        _own_layout[key] = same_bytes(torch.ops.mkldnn._reorder_linear_weight(probe, 1), probe)
    return _own_layout[key]


class PackedLinear(opaque.OpaqueLayer):
    """y = x W^T + b through oneDNN's kernel, with W in the layout it reads: W itself where that is
    W's own layout (float32), else a packed copy beside it. nn.Linear's output, read faster."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach())  # the same storage: no copy
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        # self.packed (OpaqueLayer): the weight as an opaque oneDNN tensor, made on first use where
        # oneDNN's layout is not the weight's own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:  # the kernel takes the weight's dtype only
            return self.forward_reference(x)
        if torch.compiler.is_compiling():
            if not opaque.wanted(x):
                return self.forward_reference(x)  # a gradient is wanted: the plain twin has one
            if x.dtype == torch.float32 and x.shape[:-1].numel() == 1:
                # One float32 row (a decode step): the compiler writes the dot products as its own
                # loop, which reads W faster than oneDNN's kernel (see forward_matvec).
                return self.forward_matvec(x)
            # Otherwise the compiler cannot trace the opaque packed tensor: the graph calls this
            # very forward as one operator (opaque.py), so it reads what the eager layer reads.
            return opaque.eager_layer(x, self.weight, self.layer_id)
        return torch.ops.mkldnn._linear_pointwise(x, self.kernel_weight(), self.bias, "none", [], "")

    def kernel_weight(self) -> torch.Tensor:
        """What oneDNN's kernel reads: the weight itself where its layout is oneDNN's, else the
        packed copy, packed again if the weight was replaced or written in place (load_state_dict,
        .to(...)) since."""
        if layout_is_own(self.weight):
            if self.packed is not None:  # a copy made before the question was answered: not needed
                self.packed = self.packed_from = None
            return self.weight
        key = opaque.tensor_key(self.weight)
        if self.packed is None or key != self.packed_from:
            # The batch size is a hint for the tile shape: 1, the decode step's, which is what
            # this layout is for (a 512-token prefill through it is still faster than nn.Linear).
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 1)
            self.packed_from = key
        return self.packed

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The readable twin: nn.Linear's own call."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def forward_matvec(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b for one row x, written as what it is: output o is the dot product of x with
        row o of W. Run as written (eagerly, or by the aot_eager backend) it builds the (out, in)
        products first: slow, for checking. Under inductor the product is fused into the sum: one
        loop over the plain weight's rows, split across the threads, with x held in registers. On
        GPT-2 124M that reads float32 weights faster than oneDNN's packed kernel, and a compiled
        step with it beat a whole CTranslate2 step (benchmarks/bench_matvec.py --compile). Not used
        for bfloat16, where inductor's loop converts each weight and lost to the packed kernel (one
        comparison on GPT-2 124M, not kept as a benchmark)."""
        y = (x.unsqueeze(-2) * self.weight).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)
        return y if self.bias is None else y + self.bias

    def train(self, mode: bool = True):
        if mode:
            raise TegakiError(
                "this model was prepared for decoding (its linear layers are oneDNN's read-only layers, "
                "not parameters); load it again to train it"
            )
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.weight.dtype}, oneDNN"


def _swap_in(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put a PackedLinear where each packable nn.Linear was; return (parent, name, original)."""
    swapped = []
    for name, module in list(model.named_modules()):
        if packable(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, PackedLinear(module))
            swapped.append((parent, child, module))
    return swapped


def prepare_for_decoding(model: nn.Module) -> nn.Module:
    """Swap every packable nn.Linear for a PackedLinear, for good. In place; returns the model, in
    eval mode (which it then keeps: training it is refused)."""
    _swap_in(model)
    return model.eval()


@contextmanager
def decoding_layout(model: nn.Module) -> Iterator[nn.Module]:
    """The model with packed linear layers for the length of the block, then exactly as before
    (the same nn.Linear objects, the same parameters, the same train/eval mode)."""
    swapped = _swap_in(model)
    try:
        yield model
    finally:
        for parent, child, original in reversed(swapped):
            setattr(parent, child, original)
