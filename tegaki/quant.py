"""Weight-only quantization of the linear layers: int8 (per output channel) and int4 (per group).

Decoding one token reads every weight once and does two flops per weight: the time goes into
moving weights from memory, not into arithmetic. Storing weights in 8 bits instead of 32 reads a
quarter of the bytes. Only the weights are quantized; activations stay in floating point
("weight-only"), which keeps the quality cost small.

int8, per output channel (one scale per row of W, shape (out, in)):
    scale_o = max_i |W[o, i]| / 127        q = round(W / scale) in [-127, 127]
    W ~= q * scale                          y = x @ W^T = (x @ q^T) * scale
int4, per group of `group_size` inputs in each row, asymmetric (a zero point per group):
    scale = (max - min) / 15      q = round((W - min) / scale) in [0, 15]
    W ~= (q - 8) * scale + zero   with zero = min + 8 * scale

Each layer has a readable path (dequantize, then an ordinary matmul) and a fast path; tests/test_quant.py
proves they agree within the tolerance written there.

int8's fast path multiplies in integers: the activations x of each call are quantized too, on the
fly, to 8 bits with one scale and zero point for the whole call ("dynamic" quantization), and the
CPU's int8 dot-product instructions (AVX-512 VNNI, or AVX2's) do the matmul with int32 sums:
y = (x_q - zero) @ q^T * (x_scale * scale). PyTorch's fbgemm kernel (`quantized::linear_dynamic`) does
all of it in one call, about twice as fast as multiplying int8 weights by float activations. What it
costs: x is rounded to one of 256 levels (a relative error of about 1% on each output, against 0.1% for
the weights alone); the perplexity this costs is measured in benchmarks/bench_generate.py. Without
fbgemm (non-x86 CPUs) the layer multiplies int8 weights by bf16 activations (`_weight_int8pack_mm`).
int4's fast path is `_weight_int4pack_mm_for_cpu` (float activations).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from tegaki import opaque
from tegaki.device import cpu_has
from tegaki.errors import TegakiError

# -------------------------------------------------------------------------------------------------
# The formulas
# -------------------------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> q (out, in) int8, scale (out,) float32: weight ~= q * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,): the row's largest |w| maps to 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # -128 unused: symmetric
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]  # (out, in)


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


def integer_matmul_available() -> bool:
    """PyTorch's fbgemm int8 kernels: x86 CPUs (AVX2 and up), in the PyTorch releases that have them."""
    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and hasattr(torch, "_make_per_channel_quantized_tensor")
        and hasattr(torch.ops.quantized, "linear_dynamic")
    )


INTEGER_MATMUL = integer_matmul_available()  # asked once: it does not change within a process


# FBGEMM_ENABLE_INSTRUCTIONS caps the kernels fbgemm picks (its own environment variable, read by
# fbgemm at its first call); these caps leave out its VNNI kernels.
FBGEMM_WITHOUT_VNNI = ("AVX2", "AVX512", "AVX512_256")


def activation_range_halved() -> bool:
    """Whether fbgemm's kernel here adds u8 x s8 products in 16 bits. Without VNNI it multiplies
    pairs with AVX2's vpmaddubsw, whose 16-bit sums saturate (2 x 255 x 127 > 32767); quantizing
    activations to 7 bits (fbgemm's "reduce_range") keeps them in range. fbgemm's VNNI kernels,
    which add in 32 bits and take full 8-bit activations, are AVX-512 ones: a CPU with AVX-VNNI but
    no AVX-512 (most laptop chips since 2021) gets the AVX2 kernel, and so does any CPU where
    FBGEMM_ENABLE_INSTRUCTIONS holds fbgemm back to AVX2 or plain AVX-512."""
    avx512_vnni = all(cpu_has(f) for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"))
    capped = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").strip().upper() in FBGEMM_WITHOUT_VNNI
    return not avx512_vnni or capped


# fbgemm reads its instruction cap once, at its first call, and the CPU does not change: asked once.
ACTIVATIONS_HALVED = activation_range_halved()


class Int8Linear(opaque.OpaqueLayer):
    """nn.Linear with int8 weights and one float scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight.detach())
        self.register_buffer("weight_int8", q)  # (out, in)
        self.register_buffer("scale", scale)  # (out,) float32
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))  # what the bf16 kernel takes
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.fast = True
        # self.packed (OpaqueLayer): fbgemm's packed weight, a TorchScript object, made on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fast(x) if self.fast else self.forward_reference(x)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) after quantizing casts every float buffer; the kernels insist on float32
        # and bfloat16 scales, so the scales keep their own dtype and values and only follow the
        # move to whatever device fn put the rest on.
        scale, scale_bf16 = self.scale, self.scale_bf16
        super()._apply(fn, recurse)
        self.scale, self.scale_bf16 = scale.to(self.scale.device), scale_bf16.to(self.scale_bf16.device)
        return self

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Readable: rebuild the float weight, then an ordinary linear layer."""
        w = dequantize_int8(self.weight_int8, self.scale).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def forward_integer(self, x: torch.Tensor) -> torch.Tensor:
        """Readable twin of the integer kernel, step by step (what fbgemm computes, in float here).
        x is mapped onto the codes 0..levels with one scale and zero point for the whole call, the
        range stretched to include 0 so that 0 stays exact:
            x_scale = (max(x, 0) - min(x, 0)) / levels     zero = round(-min(x, 0) / x_scale)
            x_q = clamp(round(x / x_scale) + zero, 0, levels)
            y = ((x_q - zero) @ q^T) * x_scale * scale + bias      (the matmul sums whole numbers)"""
        shape, x2 = x.shape, x.reshape(-1, self.in_features).float()
        levels = 127 if ACTIVATIONS_HALVED else 255
        low, high = min(x2.min().item(), 0.0), max(x2.max().item(), 0.0)
        x_scale = (high - low) / levels if high > low else 1.0
        zero = min(max(round(-low / x_scale), 0), levels)
        x_q = torch.clamp(torch.round(x2 / x_scale) + zero, 0, levels)  # (N, in), whole numbers
        sums = (x_q - zero) @ self.weight_int8.float().t()  # (N, out), whole numbers
        y = (sums * (x_scale * self.scale)).to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and opaque.wanted(x):
            # fbgemm's packed weight is a TorchScript object the compiler cannot trace: the graph
            # calls this very forward as one operator (opaque.py) instead of breaking around it.
            return opaque.eager_layer(x, self.weight_int8, self.layer_id)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        if x.device.type == "cpu" and INTEGER_MATMUL:
            y = torch.ops.quantized.linear_dynamic(x2.float(), self.packed_weight(), ACTIVATIONS_HALVED)
        else:  # int8 weights times bf16 activations
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight_int8, self.scale_bf16)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def packed_weight(self):
        """q and the scales as fbgemm's packed int8 weight, built on first use and again whenever
        the buffers are replaced or written (load_state_dict)."""
        key = (opaque.tensor_key(self.weight_int8), opaque.tensor_key(self.scale))
        if self.packed is None or key != self.packed_from:
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # the quantized-tensor type is on its way out of PyTorch;
                # the kernel still takes its weight that way (integer_matmul_available checks it exists)
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
                qweight = torch._make_per_channel_quantized_tensor(self.weight_int8, self.scale.double(), zeros, 0)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
            self.packed_from = key
        return self.packed

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


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
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if mode == "int4" and int4_fits(linear, group_size):
            setattr(parent, child, Int4Linear(linear, group_size))
        else:
            setattr(parent, child, Int8Linear(linear))
    return model


def int4_fits(linear: nn.Linear, group_size: int) -> bool:
    """The packed int4 kernel wants whole groups along the input and outputs in tiles of 16."""
    return linear.in_features % group_size == 0 and linear.out_features % 16 == 0


def set_fast(model: nn.Module, fast: bool) -> None:
    """Switch every quantized layer between the packed kernel and the readable dequantize path."""
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            module.fast = fast
