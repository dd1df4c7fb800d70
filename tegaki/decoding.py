"""The CPU's fast decoding layer: how each linear layer multiplies, chosen by measuring on this machine.

A decode step multiplies one vector by every weight matrix, so its time is the time to stream the
weights from memory. Which kernel streams them fastest depends on the CPU, the dtype and the shape:

    "plain"   F.linear, nn.Linear's own call: the readable twin
    "onednn"  oneDNN's kernel (`torch.ops.mkldnn._linear_pointwise`) on the weight as it is
    "packed"  the same kernel on a copy in oneDNN's own layout (`_reorder_linear_weight`)
    "loop"    tegaki's loop (tegaki/kernels/matvec.cpp, built by native.py where a C++ compiler is)
              for up to ROWS_BY_LOOP rows; oneDNN's kernel for more (a prompt)

`choose` times each path on the model's own weights of each (shape, dtype), one row at a time, in
interleaved rounds, and keeps the fastest; a path must beat the simpler ones before it by MARGIN, so
that noise never picks a slower path. Choices are kept for the process (`CHOICES`) and reported by
`describe` (`tegaki generate --verbose`).

`FastLinear` is the swapped-in layer. It keeps the original weight (the readable twin,
`forward_reference`, and what `state_dict` saves); every path equals nn.Linear up to the order of the
additions (tests/test_decoding.py). The model is handed to this layer from outside:

- `decoding_layout(model)`: for the length of a `with` block (what `generate` does);
- `prepare_for_decoding(model)`: for good, for code that only decodes (`tegaki generate`, `serve`,
  a compiled step); a prepared model refuses to train.
Both take `path=` to force one path everywhere (benchmarks, tests).

Under torch.compile a float32 row takes `forward_matvec` (dot products that inductor turns into its
own loop), and the oneDNN paths run as one operator of the graph (opaque.py). `CompiledCpuStep` is a
compiled CPU model's decode step, with attention written out (`GPT.attention_as`) so that inductor
fuses its small products; the switch lives here, not in the model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from tegaki import native, opaque
from tegaki.device import cpu_bf16_hardware
from tegaki.errors import TegakiError
from tegaki.modules import replace_module

PATHS = ("plain", "onednn", "packed", "loop")
ROWS_BY_LOOP = 8  # "loop" takes up to this many rows (a decode step); more go to oneDNN's kernel
MARGIN = 0.05  # a path must be this much faster than the simpler one to be chosen over it
MIN_ROUNDS, MAX_ROUNDS = 3, 7
BUDGET_SECONDS = 0.1  # per (shape, dtype): rounds stop once past it (and MIN_ROUNDS are done)
MEASURED_BYTES = 64 * 2**20  # enough of a model's weights of one shape to reach past the caches


def candidates(linear: nn.Module) -> tuple[str, ...]:
    """The paths that can multiply this layer here: for a CPU nn.Linear in float32, or in bfloat16 on
    a CPU that multiplies it in hardware, all four ("loop" where tegaki's loop builds); none for
    anything else (left as it is)."""
    if not isinstance(linear, nn.Linear) or not torch.backends.mkldnn.is_available():
        return ()
    w = linear.weight
    if w.device.type != "cpu" or w.dim() != 2:
        return ()
    if w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and cpu_bf16_hardware()):
        return PATHS if loop_kernel() else PATHS[:3]
    return ()


def loop_kernel():
    """torch.ops.tegaki.matvec (x (..., in), w, bias) -> (..., out) in x's dtype, built for this CPU on
    first use (native.py); None where it cannot be built."""
    return native.operator("matvec", lambda x, w, bias: x.new_empty(*x.shape[:-1], w.shape[0]))


@dataclass
class Choice:
    """The path chosen for one (out, in, dtype) on this machine, and the median times (ms for one
    row through `layers` weights of that shape) that chose it."""

    shape: tuple[int, int]
    dtype: torch.dtype
    path: str
    ms: dict[str, float] = field(default_factory=dict)
    layers: int = 0
    rounds: int = 0

    def line(self) -> str:
        times = ", ".join(f"{p} {t:.3f}" for p, t in self.ms.items())
        dtype = str(self.dtype).removeprefix("torch.")
        how = f"ms for {self.layers} layer(s), median of {self.rounds} rounds" if self.ms else "forced"
        return f"{self.shape[0]}x{self.shape[1]} {dtype}: {self.path}" + (f" ({times} {how})" if self.ms else "")


class FastLinear(opaque.OpaqueLayer):
    """y = x W^T + b through one of PATHS. nn.Linear's output, through the kernel measured fastest."""

    def __init__(self, linear: nn.Linear, path: str, choice: Choice | None = None):
        super().__init__()
        if path not in PATHS:
            raise TegakiError(f"decoding path must be one of {', '.join(PATHS)}; got {path!r}")
        self.in_features, self.out_features, self.path = linear.in_features, linear.out_features, path
        # how the path was chosen: the measurement, or none where it was forced (describe reports it)
        self.choice = choice or Choice(tuple(linear.weight.shape), linear.weight.dtype, path)
        self.register_buffer("weight", linear.weight.detach())  # the same storage: no copy
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        # self.packed (OpaqueLayer): the "packed" path's copy, made on first use
        if path == "loop":
            loop_kernel()  # built (or loaded) now, not inside a graph being compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or self.path == "plain":  # the kernels take the weight's dtype only
            return self.forward_reference(x)
        if self.path == "loop" and 0 < x.numel() // self.in_features <= ROWS_BY_LOOP:
            kernel = loop_kernel()
            return self.forward_reference(x) if kernel is None else kernel(x, self.weight, self.bias)
        if torch.compiler.is_compiling():
            if not opaque.wanted(x):
                return self.forward_reference(x)  # a gradient is wanted: the plain twin has one
            if x.dtype == torch.float32 and x.shape[:-1].numel() == 1:
                return self.forward_matvec(x)
            # The compiler cannot trace oneDNN's opaque tensor: the graph calls this very forward
            # as one operator (opaque.py), so it reads what the eager layer reads.
            return opaque.eager_layer(x, self.weight, self.layer_id)
        return torch.ops.mkldnn._linear_pointwise(x, self.kernel_weight(), self.bias, "none", [], "")

    def kernel_weight(self) -> torch.Tensor:
        """What oneDNN's kernel reads: the weight itself ("onednn"), or the packed copy ("packed"),
        packed again if the weight was replaced or written in place (load_state_dict, .to(...))."""
        if self.path in ("onednn", "loop"):  # "loop" hands oneDNN its prompts
            return self.weight
        key = opaque.tensor_key(self.weight)
        if self.packed is None or key != self.packed_from:
            # The batch size is a hint for the tile shape: 1, the decode step's.
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 1)
            self.packed_from = key
        return self.packed

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The readable twin: nn.Linear's own call."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def forward_matvec(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b for one row x, written as what it is: output o is the dot product of x with
        row o of W. Run eagerly it builds the (out, in) products first: slow, for checking. Under
        inductor the product is fused into the sum: one loop over the weight's rows, split across
        the threads, with x held in registers."""
        y = (x.unsqueeze(-2) * self.weight).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)
        return y if self.bias is None else y + self.bias

    def train(self, mode: bool = True):
        if mode:
            raise TegakiError(
                "this model was prepared for decoding (its linear layers are read-only decoding layers, "
                "not parameters); load it again to train it"
            )
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.weight.dtype}, {self.path}"


# -------------------------------------------------------------------------------------------------
# Choosing a path by measuring
# -------------------------------------------------------------------------------------------------


# (out, in, dtype, threads) -> Choice, for the process: the CPU and the kernels do not change in it.
CHOICES: dict[tuple, Choice] = {}


def pick(ms: dict[str, float]) -> str:
    """The path to keep from median times: the simpler one unless another beats it by MARGIN."""
    best = "plain"
    for path in PATHS[1:]:
        if path in ms and ms[path] < ms[best] * (1 - MARGIN):
            best = path
    return best


def _runs(weights: list[torch.Tensor], x: torch.Tensor, path: str) -> list:
    """One call per weight: x through it on `path`."""
    if path == "plain":
        return [lambda w=w: F.linear(x, w) for w in weights]
    if path == "loop":
        kernel = loop_kernel()
        return [lambda w=w: kernel(x, w, None) for w in weights]
    if path == "packed":
        weights = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    return [lambda w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in weights]


def measure(weights: list[torch.Tensor], paths: tuple[str, ...] = PATHS) -> tuple[dict[str, float], int]:
    """Median ms of one row through each weight in turn, for each path, in interleaved rounds
    (every path once per round, so that a burst of other work on the machine hits all of them).
    Returns ({path: ms}, rounds)."""
    x = torch.randn(1, weights[0].shape[1], generator=torch.Generator().manual_seed(0)).to(weights[0].dtype)
    times: dict[str, list[float]] = {p: [] for p in paths}
    with torch.inference_mode():
        runs = {p: _runs(weights, x, p) for p in paths}
        for p in paths:  # warm-up: first-call allocations and kernel selection
            for run in runs[p]:
                run()
        start = time.perf_counter()
        for r in range(MAX_ROUNDS):
            for p in paths:
                t = time.perf_counter()
                for run in runs[p]:
                    run()
                times[p].append(time.perf_counter() - t)
            if r + 1 >= MIN_ROUNDS and time.perf_counter() - start > BUDGET_SECONDS:
                break
    return {p: statistics.median(ts) * 1e3 for p, ts in times.items()}, len(times[paths[0]])


def choose(weights: list[torch.Tensor], paths: tuple[str, ...] = PATHS) -> Choice:
    """The fastest of `paths` for weights of one shape and dtype (measured once per process)."""
    w0 = weights[0]
    key = (*w0.shape, w0.dtype, torch.get_num_threads())
    if key not in CHOICES:
        measured, total = [], 0
        for w in weights:  # enough of them that the cache holds no layer from one pass to the next
            measured.append(w.contiguous())
            total += w.nbytes
            if total >= MEASURED_BYTES:
                break
        ms, rounds = measure(measured, paths)
        CHOICES[key] = Choice(tuple(w0.shape), w0.dtype, pick(ms), ms, len(measured), rounds)
    return CHOICES[key]


# -------------------------------------------------------------------------------------------------
# Handing a model to the layer
# -------------------------------------------------------------------------------------------------


def _swap_in(model: nn.Module, path: str | None) -> list[tuple[str, nn.Module]]:
    """Put a FastLinear where each nn.Linear that a path serves was, on the path chosen for its
    shape (or `path`); return (name, original) for each."""
    found = [(name, m) for name, m in model.named_modules() if candidates(m)]
    groups: dict[tuple, list[torch.Tensor]] = {}
    paths: dict[tuple, tuple[str, ...]] = {}
    for _, m in found:
        key = (*m.weight.shape, m.weight.dtype)
        groups.setdefault(key, []).append(m.weight.detach())
        paths[key] = candidates(m)
    choices = {key: Choice(key[:2], key[2], path) if path else choose(ws, paths[key]) for key, ws in groups.items()}
    for name, module in found:
        choice = choices[(*module.weight.shape, module.weight.dtype)]
        replace_module(model, name, FastLinear(module, choice.path, choice))
    return found


def prepare_for_decoding(model: nn.Module, path: str | None = None) -> nn.Module:
    """Swap every linear layer a path serves for a FastLinear, for good: on the path measured fastest
    for its shape, or on `path` everywhere. In place; returns the model, in eval mode (which it then
    keeps: training it is refused). Layers swapped already are left as they are."""
    _swap_in(model, path)
    return model.eval()


@contextmanager
def decoding_layout(model: nn.Module, path: str | None = None) -> Iterator[nn.Module]:
    """The model with FastLinear layers for the length of the block, then exactly as before (the same
    nn.Linear objects, the same parameters, the same train/eval mode)."""
    swapped = _swap_in(model, path)
    try:
        yield model
    finally:
        for name, original in reversed(swapped):
            replace_module(model, name, original)


def describe(model: nn.Module) -> list[str]:
    """One line per (shape, dtype, path) of the model's decoding layers: the path and the times
    that chose it, or "forced"."""
    groups: dict[tuple, list[FastLinear]] = {}
    for m in model.modules():
        if isinstance(m, FastLinear):
            groups.setdefault((*m.weight.shape, m.weight.dtype, m.path), []).append(m)
    return [f"{layers[0].choice.line()}; {len(layers)} layer(s)" for layers in groups.values()]


# -------------------------------------------------------------------------------------------------
# The compiled CPU step
# -------------------------------------------------------------------------------------------------


class CompiledCpuStep:
    """A compiled one-token step for a CPU model, with its attention written out while the step runs:
    inductor fuses the written-out formula's few small products into loops of its own, where the
    fused kernel would be one call over the static cache's padded slots. The model's linear layers
    are prepared for decoding for good first (a compiled graph is built for the layers a model has).
    `model` is a GPT (its `attention_as` switches the attention formula)."""

    def __init__(self, model: nn.Module, backend: str = "inductor"):
        self.model = prepare_for_decoding(model)
        self.compiled = torch.compile(model, dynamic=False, backend=backend)

    def __call__(self, *args, **kwargs):
        with self.model.attention_as("manual"):
            return self.compiled(*args, **kwargs)
