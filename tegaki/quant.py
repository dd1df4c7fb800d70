"""Quantization of the linear layers: int8 and int4, each by groups of inputs.

Decoding one token reads every weight once and does two flops per weight: the time goes into
moving weights from memory, not into arithmetic. Storing weights in 8 bits instead of 32 reads a
quarter of the bytes.

int8, symmetric, one scale per group of GROUP_SIZE = 32 inputs in each row: a group's largest weight
sets its step, so a large weight costs precision only to the 31 beside it, not to its whole row.
The scale is kept in float16, so a group is exactly a block of llama.cpp's q8_0 (34 bytes for 32
weights):
    scale[o, g] = float16(max_i |W[o, g*32 + i]| / 127)      q = round(W / scale) in [-127, 127]
    W ~= q * scale
A decode step (up to ROWS_BY_LOOP rows) quantizes its activations the same way, by groups of 32
(`quantize_rows_q8`), and takes each group's dot product in integers, as llama.cpp's q8_0 x q8_0 does:
    y[r, o] = sum_g scale[o, g] * step[r, g] * (qx[r, g] . q[o, g])          (`q8_matvec`)
A prompt (more rows) multiplies float activations by the dequantized weight; so does a layer whose
rows 32 does not divide, which takes one scale per row (`int8_matvec`).
int4, per group of `group_size` inputs in each row, asymmetric (a zero point per group):
    scale = (max - min) / 15      q = round((W - min) / scale) in [0, 15]
    W ~= (q - 8) * scale + zero   with zero = min + 8 * scale

Each layer has a readable path (`forward_reference`: the formulas above, written out) and a fast path;
tests/test_quant.py proves they agree within the tolerance written there.

int8's fast paths, for the few rows of a decode step, are loops written by hand in C++ and built for
this CPU by `native.py`: tegaki/kernels/q8_matvec.cpp (`q8_matvec`, on the weight in the loop's order,
`pack_q8`) and tegaki/kernels/int8_matvec.cpp (`int8_matvec`), each reading every int8 weight once.
Where no C++ compiler is installed the readable path runs. int4's fast path is
`_weight_int4pack_mm_for_cpu` (float activations).
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
FLOAT16_TINIEST = 2.0**-24  # the smallest float16 above zero: an all-zero group keeps a usable scale


def int8_group(in_features: int, group_size: int = GROUP_SIZE) -> int:
    """The group size a row of `in_features` takes: GROUP_SIZE where it divides the row, else the
    whole row (one scale per output channel)."""
    return group_size if in_features % group_size == 0 else in_features


def quantize_int8(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> q (out, in) int8, scale (out, in // g) float16: weight ~= q * scale, by groups."""
    out_f, in_f = weight.shape
    g = int8_group(in_f, group_size)
    w = weight.float().view(out_f, in_f // g, g)  # (out, groups, g)
    step = w.abs().amax(dim=-1) / 127.0  # (out, groups): the group's largest |w| -> 127
    scale = step.clamp(min=FLOAT16_TINIEST).to(torch.float16)  # rounded once; q is made with what is kept
    q = torch.round(w / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)  # -128 unused: symmetric
    return q.view(out_f, in_f), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out_f, in_f = q.shape
    return (q.view(out_f, scale.shape[1], -1).float() * scale.float()[..., None]).view(out_f, in_f)  # (out, in)


def int8_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """x (N, in) float32 times the int8 weight, group by group, plus bias: (N, out). The readable twin
    of the C++ loop (`int8_kernel`), which computes the same sums without ever storing `w`."""
    out_f, in_f = q.shape
    groups = scale.shape[1]
    w = q.view(out_f, groups, in_f // groups) * scale.float().unsqueeze(-1)  # (out, groups, g)
    y = (x.view(-1, 1, groups, in_f // groups) * w).sum((-1, -2))  # (N, 1, groups, g) * w -> (N, out)
    return y if bias is None else y + bias


def quantize_rows_q8(x: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations quantized like a weight, for an int8 x int8 product: x (N, in) -> qx (N, in) int8 and
    step (N, in // 32) float32, x ~= qx * step by groups of 32 (llama.cpp's q8_0 blocks, both sides).
    Rounded as the C++ loop rounds: x times 1/step, to nearest with ties to even."""
    n, in_f = x.shape
    xg = x.float().view(n, in_f // group_size, group_size)
    step = xg.abs().amax(dim=-1) / 127.0  # (N, groups)
    inverse = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    qx = torch.round(xg * inverse[..., None]).to(torch.int8)  # |x * 127 / max| <= 127
    return qx.view(n, in_f), step


def q8_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """x (N, in) times the int8 weight with x quantized too (`quantize_rows_q8`): each group's dot
    product is a sum of int8 x int8 products, exact in integers, then scaled by both steps:
        y[r, o] = bias[o] + sum_g scale[o, g] * step[r, g] * (qx[r, g] . q[o, g])
    The readable twin of the C++ loop (`q8_kernel`), llama.cpp's q8_0 x q8_0 dot product."""
    out_f, in_f = q.shape
    groups = scale.shape[1]
    qx, step = quantize_rows_q8(x, in_f // groups)
    qxg = qx.view(-1, groups, in_f // groups).float()  # (N, groups, 32)
    qg = q.view(out_f, groups, in_f // groups).float()  # (out, groups, 32)
    # Each group's dot product of integers: products up to 127 * 127, sums of 32 of them below 2**24,
    # so float32 holds every partial sum exactly, in any order.
    dots = torch.einsum("ngi,ogi->nog", qxg, qg)  # (N, out, groups)
    y = (dots * (scale.float() * step[:, None, :])).sum(-1)  # (N, out)
    return y if bias is None else y + bias.float()


TILE = 16  # output rows the C++ loop's weight layout interleaves: one AVX-512 register of sums


def pack_q8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 weight (out, in) in the order the C++ loop reads it, groups of 32 only:
        tiles   (tiles, groups, 8, 16, 4) int8: for each tile of 16 rows and each group, 8 pieces of
                4 inputs of each of the 16 rows (one piece, 64 bytes, is one register)
        scale   (tiles, groups, 16) float16: the 16 rows' scales of the group
    Rows past `out` (the last tile's padding) are zeros."""
    out_f, in_f = q.shape
    groups = scale.shape[1]
    n_tiles = -(-out_f // TILE)
    padded = torch.zeros(n_tiles * TILE, in_f, dtype=torch.int8)
    padded[:out_f] = q
    tiles = padded.view(n_tiles, TILE, groups, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
    tile_scale = torch.zeros(n_tiles * TILE, groups, dtype=torch.float16)
    tile_scale[:out_f] = scale
    tile_scale = tile_scale.view(n_tiles, TILE, groups).transpose(1, 2).contiguous()
    return tiles, tile_scale


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


def q8_kernel():
    """torch.ops.tegaki.q8_matvec (x (..., in), tiles, tile_scale, bias, out) -> (..., out) in
    x's dtype: `q8_matvec` on pack_q8's layout, built for this CPU on first use; None where it cannot be
    built."""
    return native.operator("q8_matvec", lambda x, tiles, tile_scale, bias, out: x.new_empty(*x.shape[:-1], out))


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one float16 scale per group of 32 inputs: llama.cpp's q8_0 blocks."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight.detach())
        self.register_buffer("weight_int8", q)  # (out, in)
        self.register_buffer("scale", scale)  # (out, groups) float16
        # Groups of 32: a decode step quantizes its activations too and takes int8 x int8 dot products
        # (`q8_matvec`) on the weight in the loop's order, a copy made once here (not saved).
        self.q8 = scale.shape[1] * GROUP_SIZE == self.in_features
        if self.q8:
            tiles, tile_scale = pack_q8(q, scale)
            self.register_buffer("tiles", tiles, persistent=False)
            self.register_buffer("tile_scale", tile_scale, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fast(x) if self.fast else self.forward_reference(x)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) after quantizing casts every float buffer; the scales keep float16 (and
        # their values) and only follow the move to whatever device fn put the rest on.
        scales = {name: getattr(self, name) for name in ("scale", "tile_scale") if hasattr(self, name)}
        super()._apply(fn, recurse)
        for name, scale in scales.items():
            setattr(self, name, scale.to(self.weight_int8.device))
        return self

    def decode_step(self, x: torch.Tensor) -> bool:
        """Whether x is a decode step's few rows (1 to ROWS_BY_LOOP), which the C++ loops take."""
        return 0 < x.numel() // self.in_features <= ROWS_BY_LOOP

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Readable, the formula the fast path computes: for a decode step in groups of 32,
        `q8_matvec` (int8 activations); else rebuild the float weight, then an ordinary linear layer."""
        if self.q8 and self.decode_step(x):
            y = q8_matvec(x.reshape(-1, self.in_features), self.weight_int8, self.scale, self.bias)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        w = dequantize_int8(self.weight_int8, self.scale).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """A few rows (a decode step of a batch of up to ROWS_BY_LOOP): a C++ loop, (..., in) ->
        (..., out) in x's dtype; int8 x int8 (`q8_matvec`) for groups of 32, int8 x float
        (`int8_matvec`) for whole rows. More rows (a prompt), or no compiler: the readable path."""
        if self.decode_step(x) and x.device.type == "cpu":
            if self.q8 and (q8 := q8_kernel()) is not None:
                return q8(x, self.tiles, self.tile_scale, self.bias, self.out_features)
            if not self.q8 and (kernel := int8_kernel()) is not None:
                return kernel(x, self.weight_int8, self.scale, self.bias)
        return self.forward_reference(x)

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
            f"int8/int4 quantization uses PyTorch's packed CPU kernels; the model is on {device}. "
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
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if any(m.q8 for m in int8):  # built (or loaded) now, not inside a timed token or a graph being compiled
        q8_kernel()
    if any(not m.q8 for m in int8):
        int8_kernel()
    return model


def int4_fits(linear: nn.Linear, group_size: int) -> bool:
    """The packed int4 kernel wants whole groups along the input and outputs in tiles of 16."""
    return linear.in_features % group_size == 0 and linear.out_features % 16 == 0


def set_fast(model: nn.Module, fast: bool) -> None:
    """Switch every quantized layer between its fast kernels and its readable path (forward_reference)."""
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            module.fast = fast


def quantized_kernels(model: nn.Module) -> list[str]:
    """What the model's quantized layers run, one line per kind (for `tegaki generate --verbose`)."""
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    lines = []
    for q8, kernel, what in ((True, q8_kernel, "int8 x int8"), (False, int8_kernel, "int8 x float")):
        layers = [m for m in int8 if m.q8 == q8]
        if not layers:
            continue
        loop = kernel() is not None
        how = f"tegaki's C++ loop ({native.isa()})" if loop else "the readable formula (no C++ compiler)"
        groups = f"groups of {GROUP_SIZE}" if q8 else "one scale per row"
        lines.append(
            f"int8, {groups}: {len(layers)} layer(s); up to {ROWS_BY_LOOP} rows {what} through {how}, more dequantized"
        )
    if int4:
        lines.append(f"int4: {len(int4)} layer(s) through _weight_int4pack_mm_for_cpu")
    return lines
