"""Making decoding fast without changing what the model computes.

Decoding one token multiplies one vector by every weight matrix of the model, so the time goes
into reading the weights from memory (GPT-2 124M: 500 MB of float32 per token). Two things decide
how fast those reads go, and neither changes the value of a single weight:

1. How many matrices. Attention's q, k and v projections read the same input. Stacked along the
   output they are one (3C, C) matrix: one matmul instead of three, one long stream of memory
   instead of three short ones. The three projections stay where they are -- model.py, the
   checkpoints and training all still see q_proj, k_proj and v_proj -- but their tensors become
   views into the stacked one, so each number exists once and nothing can drift apart.

2. The memory layout. A (out, in) weight can be stored row after row (PyTorch's default) or
   column after column. Which of the two the CPU's matrix-vector kernel streams faster depends on
   the shape, the dtype and the BLAS library underneath: on a 2-core AVX2 machine, GPT-2's wide
   float32 matrices (out >= in) ran 20-40% faster column-major, the MLP's down projection
   (out < in) faster row-major, and bfloat16 row-major throughout. So the layout is measured, per
   shape and dtype, on the machine at hand, and the faster one is kept.

`prepare_for_decoding(model)` does both, in place, and is cheap to call again; `tegaki.generate`
calls it. tests/test_fastpath.py proves the prepared model gives the unprepared model's logits and
tokens, and that moving, casting or quantizing a prepared model falls back to the separate
projections instead of reading a stale stacked copy.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from tegaki.quant import Int8Linear

# The tensors that make up each kind of layer that can be stacked with others of its kind. (int4's
# packed tiles and (groups, out, 2) scales do not stack along the output as plain rows do.)
STACKABLE: dict[type, tuple[str, ...]] = {
    nn.Linear: ("weight", "bias"),
    Int8Linear: ("weight_int8", "scale", "scale_bf16", "bias"),
}


def prepare_for_decoding(model: nn.Module) -> nn.Module:
    """Stack q/k/v of every attention layer and give each float weight its faster layout."""
    from tegaki.model import Attention

    with torch.inference_mode(False), torch.no_grad():  # plain tensors: the model may train later
        stacked: set[int] = set()
        for module in model.modules():
            if not isinstance(module, Attention):
                continue
            parts = [module.q_proj, module.k_proj, module.v_proj]
            fused = module.fused_qkv
            if fused is None or not fused.holds(parts):
                fused = StackedLinear.stack(parts)
                # A plain attribute, not a registered submodule: the stacked tensors must not
                # appear a second time in state_dict(), parameters() or .to().
                module.__dict__["fused_qkv"] = fused
            if fused is not None:
                stacked.update(id(p) for p in parts)
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module) not in stacked:
                set_layout(module, layout_for(module.weight, module.out_features))
    return model


def layout_for(weight: torch.Tensor, out_features: int) -> str:
    """The faster layout for this weight's shape and dtype: measured on CPUs, row-major elsewhere
    (GPU matmul libraries take either layout at full speed)."""
    if weight.device.type != "cpu" or not weight.dtype.is_floating_point:
        return "row"
    return faster_layout(out_features, weight.shape[1], weight.dtype)


def standalone(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous tensor that owns its memory: what safetensors insists on. A prepared
    model's q/k/v weights are views into one stacked matrix; a saved copy must not be."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


# -------------------------------------------------------------------------------------------------
# Stacking layers that read the same input
# -------------------------------------------------------------------------------------------------


class StackedLinear(nn.Module):
    """Layers that read the same input, as one: y = x W^T with W their weights stacked along the
    output. Each layer's own tensors are views into the stacked ones."""

    def __init__(self, inner: nn.Module, parts: list[nn.Module]):
        super().__init__()
        self.inner = inner  # an nn.Linear / Int8Linear whose tensors are the stacked ones
        self.part_tensors = [(part, _tensor_ptrs(part)) for part in parts]

    @classmethod
    def stack(cls, parts: list[nn.Module]) -> "StackedLinear | None":
        kind = type(parts[0])
        names = STACKABLE.get(kind)
        if names is None or any(type(p) is not kind for p in parts):
            return None
        if len({p.in_features for p in parts}) != 1:
            return None
        inner = kind.__new__(kind)
        nn.Module.__init__(inner)
        # Plain settings (in_features, the int8 layer's `fast` switch, ...) come from the first part.
        inner.__dict__.update({k: v for k, v in vars(parts[0]).items() if not k.startswith("_") and k not in names})
        inner.out_features = sum(p.out_features for p in parts)
        sizes = [p.out_features for p in parts]
        for name in names:
            pieces = [getattr(p, name) for p in parts]
            if any(piece is None for piece in pieces):
                setattr(inner, name, None)
                continue
            whole = torch.cat([piece.detach() for piece in pieces], dim=0)  # (sum of outs, ...)
            if name == "weight" and kind is nn.Linear and layout_for(whole, whole.shape[0]) == "column":
                whole = _column_major(whole)
            for piece, view in zip(pieces, whole.split(sizes, dim=0)):
                piece.data = view  # the part keeps its Parameter / buffer object, now a view
            if isinstance(pieces[0], nn.Parameter):
                setattr(inner, name, nn.Parameter(whole, requires_grad=False))
            else:
                inner.register_buffer(name, whole)
        return cls(inner, parts)

    def holds(self, parts: list[nn.Module]) -> bool:
        """Are these layers still the ones stacked here, their tensors still views into it? Casting
        or moving the model (`.to()`) or replacing a layer (quantize_model) gives them tensors of
        their own; then the stacked copy is stale and must not be used."""
        if len(parts) != len(self.part_tensors):
            return False
        return all(part is old and _tensor_ptrs(part) == ptrs for part, (old, ptrs) in zip(parts, self.part_tensors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.inner, Int8Linear):  # follow the parts' fast/readable switch (quant.set_fast)
            self.inner.fast = self.part_tensors[0][0].fast
        return self.inner(x)


def _tensor_ptrs(module: nn.Module) -> tuple[int, ...]:
    return tuple(0 if t is None else t.data_ptr() for t in (getattr(module, n) for n in STACKABLE[type(module)]))


# -------------------------------------------------------------------------------------------------
# Memory layout
# -------------------------------------------------------------------------------------------------


def _column_major(w: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix, stored column after column: w.t() is contiguous."""
    return w.t().contiguous().t()


def _is_column_major(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.shape[0] > 1 and w.stride() == (1, w.shape[0])


def set_layout(linear: nn.Linear, layout: str) -> None:
    """Store linear.weight row-major or column-major; same values, same Parameter object. A tied
    weight (GPT-2's LM head is the embedding table) changes for both: an embedding lookup reads a
    strided column then, 768 numbers, which costs microseconds."""
    w = linear.weight
    if layout == "column" and not _is_column_major(w):
        w.data = _column_major(w.data)
    elif layout == "row" and not w.is_contiguous():
        w.data = w.data.contiguous()


_measured: dict[tuple, str] = {}


def faster_layout(out_features: int, in_features: int, dtype: torch.dtype) -> str:
    """'row' or 'column': the storage in which a (out, in) weight multiplies one vector faster on
    this machine, measured once per shape, dtype and thread count. Column wins only by a clear
    margin (5%), so noise leaves PyTorch's default."""
    key = (out_features, in_features, dtype, torch.get_num_threads())
    if key not in _measured:
        row, column = _time_layouts(out_features, in_features, dtype)
        _measured[key] = "column" if column < 0.95 * row else "row"
    return _measured[key]


MEASURE_BYTES = 64 << 20  # beyond a CPU's caches, as a real model's weights are


def _time_layouts(out_features: int, in_features: int, dtype: torch.dtype) -> tuple[float, float]:
    """Best-of-5 seconds for one vector times each of n copies of the matrix, row- and
    column-major, n copies making ~64 MiB. A matrix larger than that (a big vocabulary's LM head)
    is measured with fewer rows, keeping its wide-or-narrow shape, so that measuring never
    allocates gigabytes."""
    row_bytes = in_features * torch.finfo(dtype).bits // 8
    if out_features * row_bytes > MEASURE_BYTES:
        fitting = max(1, MEASURE_BYTES // row_bytes)
        out_features = max(in_features, fitting) if out_features >= in_features else min(out_features, fitting)
    size = out_features * row_bytes
    n = max(1, min(64, MEASURE_BYTES // max(size, 1)))
    x = torch.full((1, in_features), 0.5, dtype=dtype)
    rows = [torch.full((out_features, in_features), 0.01, dtype=dtype) for _ in range(n)]
    times = []
    for ws in (rows, [_column_major(w) for w in rows]):
        best = float("inf")
        for _ in range(6):  # the first round warms up
            t = time.perf_counter()
            for w in ws:
                F.linear(x, w)
            best = min(best, time.perf_counter() - t)
        times.append(best)
    return times[0], times[1]
