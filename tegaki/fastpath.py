"""Making decoding fast without changing a weight's value: how the weights are stored.

Decoding one token multiplies one vector by every weight matrix of the model, so the time goes
into reading the weights from memory (GPT-2 124M: 500 MB of float32 per token). Two things decide
how fast those reads go:

1. How many matrices. Attention's q, k and v projections read the same input. Stacked along the
   output they are one (3C, C) matrix: one matmul instead of three, one long stream of memory
   instead of three short ones. The three projections stay where they are -- model.py, the
   checkpoints and training all still see q_proj, k_proj and v_proj -- but their tensors become
   views into the stacked one, so each number exists once and nothing can drift apart.

2. The memory layout. A (out, in) weight can be stored row after row (PyTorch's default) or
   column after column. For one vector times a float32 matrix with out >= in, CPU BLAS streams
   the column-major copy faster: on a 2-core AVX2 machine 20-40% for GPT-2's q/k/v, MLP up
   projection and LM head, while the down projection (out < in) and every bfloat16 matrix were
   fastest row-major (benchmarks/bench_generate.py measures both layouts in every run). The
   rule is fixed, not timed at run time, so that the same model gives the same numbers in every
   process.

`prepare_for_decoding(model)` does both, in place: the `tegaki generate` command and the benchmark
call it; in Python, `generate(..., prepare=True)` or a direct call. It is for inference:
optimizers (the fused AdamW especially) expect plain contiguous parameters, so `model.train()`
calls `restore_plain_layout`, which undoes it. While a stack is in use, forward hooks on q_proj,
k_proj and v_proj do not fire (one matmul runs for the three), and a compiled forward cannot check
that a stack is current: `generate` and `load_state_dict` drop stale stacks, but after assigning
new projection weights by hand, call `drop_stale_stacks` (or prepare again) before a compiled
forward. tests/test_fastpath.py proves a prepared model gives
the unprepared model's tokens, trains like it after `train()`, and never reads a stale stacked copy.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tegaki.quant import Int8Linear

# The tensors that make up each kind of layer that can be stacked with others of its kind. (int4's
# packed tiles and (groups, out, 2) scales do not stack along the output as plain rows do.)
STACKABLE: dict[type, tuple[str, ...]] = {
    nn.Linear: ("weight", "bias"),
    Int8Linear: ("weight_int8", "scale", "scale_bf16", "bias"),
}


def prepare_for_decoding(model: nn.Module) -> nn.Module:
    """Stack q/k/v of every attention layer and store each float weight in its decoding layout."""
    from tegaki.model import GPT, Attention

    with torch.inference_mode(False), torch.no_grad():  # plain tensors, not inference tensors
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
                set_layout(module, decoding_layout(module.weight))
            if isinstance(module, GPT):
                module.__dict__["prepared_for_decoding"] = True  # GPT.train() restores it
    return model


def restore_plain_layout(model: nn.Module) -> nn.Module:
    """Undo `prepare_for_decoding`: every parameter and buffer (and gradient) a contiguous tensor
    with memory of its own again, the stacks dropped. Same values. Cheap when there is nothing to
    undo; tensors of other kinds (distributed shards) are left alone."""
    from tegaki.model import Attention

    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention):
                module.__dict__["fused_qkv"] = None
        for t in list(model.parameters()) + list(model.buffers()):
            if type(t.data) is torch.Tensor and not _owns_memory(t.data):
                t.data = t.data.clone(memory_format=torch.contiguous_format)
            grad = getattr(t, "grad", None)
            if grad is not None and type(grad) is torch.Tensor and not grad.is_contiguous():
                t.grad = grad.contiguous()  # a gradient keeps its parameter's old layout
    return model


def _owns_memory(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def drop_stale_stacks(model: nn.Module) -> None:
    """Forget every stack whose projections no longer live in it (a compiled step cannot check)."""
    from tegaki.model import Attention

    for module in model.modules():
        if isinstance(module, Attention) and module.fused_qkv is not None:
            if not module.fused_qkv.holds([module.q_proj, module.k_proj, module.v_proj]):
                module.__dict__["fused_qkv"] = None


def standalone(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous tensor that owns its memory: what safetensors insists on. A prepared
    model's q/k/v weights are views into one stacked matrix; a saved copy must not be."""
    return t if _owns_memory(t) else t.clone(memory_format=torch.contiguous_format)


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
        self.sizes = [part.out_features for part in parts]  # how to split the output again

    @classmethod
    def stack(cls, parts: list[nn.Module]) -> "StackedLinear | None":
        """None when the parts cannot share one matrix: different kinds of layer (a LoRA wrapper,
        int4), different inputs, or tensors of different dtypes or devices."""
        kind = type(parts[0])
        names = STACKABLE.get(kind)
        if names is None or any(type(p) is not kind for p in parts):
            return None
        if len({p.in_features for p in parts}) != 1:
            return None
        for name in names:  # each tensor the same dtype and device in every part
            kinds = {None if getattr(p, name) is None else (getattr(p, name).dtype, getattr(p, name).device) for p in parts}
            if len(kinds) > 1:
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
            if name == "weight" and kind is nn.Linear and decoding_layout(whole) == "column":
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
        or moving the model, replacing or re-parametrizing a layer, loading with assign=True:
        each gives them tensors of their own, and then the stacked copy is stale."""
        if len(parts) != len(self.part_tensors):
            return False
        return all(part is old and _tensor_ptrs(part) == ptrs for part, (old, ptrs) in zip(parts, self.part_tensors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.inner, Int8Linear):  # follow the parts' fast/readable switch (quant.set_fast)
            self.inner.fast = self.part_tensors[0][0].fast
        return self.inner(x)


def _tensor_ptrs(module: nn.Module) -> tuple[int, ...] | None:
    names = STACKABLE.get(type(module))  # None for a layer whose class changed (parametrizations)
    if names is None:
        return None
    return tuple(0 if t is None else t.data_ptr() for t in (getattr(module, n) for n in names))


# -------------------------------------------------------------------------------------------------
# Memory layout
# -------------------------------------------------------------------------------------------------


def decoding_layout(weight: torch.Tensor) -> str:
    """'column' for a float32 (out, in) CPU weight with out >= in, else 'row' (see the top of this
    file). GPU matmul libraries read either layout at full speed: row there."""
    out_features, in_features = weight.shape
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and out_features >= in_features:
        return "column"
    return "row"


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
