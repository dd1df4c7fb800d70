"""Weight-only quantization of the linear layers: int8 and int4, each by groups of inputs.

Decoding one token reads every weight once and does two flops per weight: the time goes into
moving weights from memory, not into arithmetic. Storing weights in 8 bits instead of 32 reads a
quarter of the bytes. Only the weights are quantized; activations stay in floating point
("weight-only"), which keeps the quality cost small.

int8, symmetric, one scale per group of GROUP_SIZE = 32 inputs in each row (the block of llama.cpp's
q8_0): a group's largest weight sets its step, so a large weight costs precision only to the 31
beside it, not to its whole row:
    scale[o, g] = max_i |W[o, g*32 + i]| / 127        q = round(W / scale) in [-127, 127]
    W ~= q * scale                                     y[o] = sum_g scale[o, g] * (x_g . q[o, g])
int4, per group of `group_size` inputs in each row, asymmetric (a zero point per group):
    scale = (max - min) / 15      q = round((W - min) / scale) in [0, 15]
    W ~= (q - 8) * scale + zero   with zero = min + 8 * scale

Each layer has a readable path (dequantize, then an ordinary matmul) and a fast path; tests/test_quant.py
proves they agree within the tolerance written there.

int8's fast path, for the few rows of a decode step, is a loop written by hand in C++
(tegaki/kernels/int8_matvec.cpp, built for this CPU by `native.py`): `int8_matvec` below as the loop it
is, reading each int8 weight once and never storing the float weight. Where no C++ compiler is
installed, and for many rows (a prompt), the layer dequantizes and multiplies (the readable path,
whose matmul pays back the float copy it makes). int4's fast path is `_weight_int4pack_mm_for_cpu`
(float activations).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tegaki import native
from tegaki.errors import TegakiError
from tegaki.modules import replace_module

# -------------------------------------------------------------------------------------------------
# The formulas
# -------------------------------------------------------------------------------------------------


GROUP_SIZE = 32  # inputs per int8 scale: llama.cpp's q8_0 block


def int8_group(in_features: int, group_size: int = GROUP_SIZE) -> int:
    """The group size a row of `in_features` takes: GROUP_SIZE where it divides the row, else the
    whole row (one scale per output channel)."""
    return group_size if in_features % group_size == 0 else in_features


def quantize_int8(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> q (out, in) int8, scale (out, in // g) float32: weight ~= q * scale, by groups."""
    out_f, in_f = weight.shape
    g = int8_group(in_f, group_size)
    w = weight.float().view(out_f, in_f // g, g)  # (out, groups, g)
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0  # (out, groups): the group's largest |w| -> 127
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)  # -128 unused: symmetric
    return q.view(out_f, in_f), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out_f, in_f = q.shape
    return (q.view(out_f, scale.shape[1], -1).float() * scale[..., None]).view(out_f, in_f)  # (out, in)


def int8_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """x (N, in) float32 times the int8 weight, group by group, plus bias: (N, out). The readable twin
    of the C++ loop (`int8_kernel`), which computes the same sums without ever storing `w`."""
    out_f, in_f = q.shape
    groups = scale.shape[1]
    w = q.view(out_f, groups, in_f // groups) * scale.unsqueeze(-1)  # (out, groups, g)
    y = (x.view(-1, 1, groups, in_f // groups) * w).sum((-1, -2))  # (N, 1, groups, g) * w -> (N, out)
    return y if bias is None else y + bias


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (out, in) -> q (out, in) int32 in [0, 15], scale and zero (out, in // group_size)."""
    out_f, in_f = weight.shape
    w = weight.float().view(out_f, in_f // group_size, group_size)  # (out, groups, g)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (out, groups)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    zero = low + 8.0 * scale  # the value that q = 8 (the middle code) stands for
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(out_f, in_f), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = q.shape
    qg = q.view(out_f, in_f // group_size, group_size).float()  # (out, groups, g)
    return ((qg - 8.0) * scale[..., None] + zero[..., None]).view(out_f, in_f)


# -------------------------------------------------------------------------------------------------
# Layers that replace nn.Linear
# -------------------------------------------------------------------------------------------------


# Up to this many rows (a batch's decode step, a short prompt) go through the C++ loop, which makes each
# int8 weight a float once for 8 rows at a time; more are dequantized once and multiplied. The loop's
# cost grows with the rows and the dequantized matmul's hardly: on GPT-2's shapes they cross at a few
# dozen rows.
ROWS_BY_LOOP = 32


def int8_kernel():
    """torch.ops.tegaki.int8_matvec (x (..., in), q, scale, bias) -> (..., out) in x's dtype, built for
    this CPU on first use (native.py); None where it cannot be built (no C++ compiler)."""
    return native.operator("int8_matvec", lambda x, q, scale, bias: x.new_empty(*x.shape[:-1], q.shape[0]))


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one float scale per group of 32 inputs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight.detach())
        self.register_buffer("weight_int8", q)  # (out, in)
        self.register_buffer("scale", scale)  # (out, groups) float32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fast(x) if self.fast else self.forward_reference(x)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) after quantizing casts every float buffer; the scales keep float32 (and
        # their values) and only follow the move to whatever device fn put the rest on.
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.scale.device)
        return self

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Readable: rebuild the float weight, then an ordinary linear layer."""
        w = dequantize_int8(self.weight_int8, self.scale).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """A few rows (a decode step of a batch of up to ROWS_BY_LOOP): the C++ loop, (..., in) ->
        (..., out) in x's dtype. More rows (a prompt), or no compiler: the readable path."""
        rows = x.numel() // self.in_features
        kernel = int8_kernel() if 0 < rows <= ROWS_BY_LOOP and x.device.type == "cpu" else None
        if kernel is None:
            return self.forward_reference(x)
        return kernel(x, self.weight_int8, self.scale, self.bias)

    def extra_repr(self) -> str:
        g = self.in_features // self.scale.shape[1]
        return f"in={self.in_features}, out={self.out_features}, int8 groups of {g}"


class Int4Linear(nn.Module):
    """nn.Linear with 4-bit weights, a scale and a zero point per group of inputs."""

    def __init__(self, linear: nn.Linear, group_size: int = 64):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % group_size:
            raise TegakiError(f"int4 needs in_features ({self.in_features}) divisible by the group size {group_size}")
        self.group_size = group_size
        q, scale, zero = quantize_int4(linear.weight.detach(), group_size)
        self.register_buffer("weight_int4", q.to(torch.uint8))  # (out, in), one code per byte: readable
        self.register_buffer("scale", scale)  # (out, groups)
        self.register_buffer("zero", zero)
        # The kernel's layout: two codes per byte in tiles, and (groups, out, 2) scales and zeros.
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scale_zero", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fast(x) if self.fast else self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_int4(self.weight_int4.to(torch.int32), self.scale, self.zero, self.group_size).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zero.to(x.dtype))
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 groups of {self.group_size}"


# -------------------------------------------------------------------------------------------------
# Whole models
# -------------------------------------------------------------------------------------------------

SKIPPED = ("router",)  # MoE routers: tiny, and a flipped expert choice costs more than it saves


def quantize_model(model: nn.Module, mode: str = "int8", *, group_size: int = 64) -> nn.Module:
    """Replace every nn.Linear of the blocks and the LM head, in place. A tied LM head gets its own
    quantized copy; the embedding table stays in float (only one row per token is read).
    MoE expert weights (not nn.Linear) stay in float. With int4, a layer whose shape the int4
    kernel cannot tile (GPT-2's 50,257-word head) is quantized to int8 instead."""
    if mode not in ("int8", "int4"):
        raise TegakiError(f"quantize mode must be 'int8' or 'int4', got {mode!r}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise TegakiError(
            f"int8/int4 weight-only quantization uses PyTorch's packed CPU kernels; the model is on {device}. "
            "On a GPU, decode in bf16 (--dtype bf16) instead, or quantize on --device cpu"
        )
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in SKIPPED
    ]
    for name, linear in targets:
        fits = mode == "int4" and int4_fits(linear, group_size)
        replace_module(model, name, Int4Linear(linear, group_size) if fits else Int8Linear(linear))
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        int8_kernel()  # built (or loaded) now, not inside a timed token or a graph being compiled
    return model


def int4_fits(linear: nn.Linear, group_size: int) -> bool:
    """The packed int4 kernel wants whole groups along the input and outputs in tiles of 16."""
    return linear.in_features % group_size == 0 and linear.out_features % 16 == 0


def set_fast(model: nn.Module, fast: bool) -> None:
    """Switch every quantized layer between the packed kernel and the readable dequantize path."""
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            module.fast = fast


def quantized_kernels(model: nn.Module) -> list[str]:
    """What the model's quantized layers run, one line per kind (for `tegaki generate --verbose`)."""
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    lines = []
    if int8:
        how = f"tegaki's C++ loop ({native.isa()})" if int8_kernel() else "dequantize + matmul (no C++ compiler)"
        lines.append(
            f"int8, groups of {GROUP_SIZE}: {len(int8)} layer(s); "
            f"up to {ROWS_BY_LOOP} rows through {how}, more dequantized"
        )
    if int4:
        lines.append(f"int4: {len(int4)} layer(s) through _weight_int4pack_mm_for_cpu")
    return lines
