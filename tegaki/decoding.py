"""The CPU's fast decoding layer: how each linear layer multiplies, chosen by measuring on this machine.

A decode step multiplies one vector by every weight matrix, so its time is the time to stream the
weights from memory. Which kernel streams them fastest depends on the CPU, the dtype and the shape:

    "plain"   F.linear, nn.Linear's own call: the readable twin
    "loop"    tegaki's loop (tegaki/kernels/matvec.cpp, built by native.py where a C++ compiler is)
              for up to ROWS_BY_LOOP rows; oneDNN's kernel for more (a prompt)
    "onednn"  oneDNN's kernel (`torch.ops.mkldnn._linear_pointwise`) on the weight as it is
    "packed"  the same kernel on a copy in oneDNN's own layout (`_reorder_linear_weight`)

`choose` times each path on the model's own weights of each (shape, dtype), one row at a time as a
decode step multiplies them, every shape in turn and every path in interleaved rounds, and keeps the
fastest; a path must beat the ones before it by MARGIN, so that noise never picks a slower path.
Choices are kept for the process (`CHOICES`) and reported by `describe` (`tegaki generate --verbose`).

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
from tegaki.device import cpu_bf16_hardware, last_level_cache_bytes
from tegaki.errors import TegakiError
from tegaki.modules import replace_module

# In order of what each asks for beyond PyTorch's own call: tegaki's loop (a build, once per machine);
# oneDNN's kernel (a private operator); its packed layout (a private operator and a copy of the weight).
PATHS = ("plain", "loop", "onednn", "packed")
ROWS_BY_LOOP = 8  # "loop" takes up to this many rows (a decode step); more go to oneDNN's kernel
MARGIN = 0.05  # a path must be this much faster than every path before it in PATHS to be chosen
MIN_ROUNDS, MAX_ROUNDS = 3, 7
BUDGET_SECONDS = 0.3  # for a model's shapes together: rounds stop once past it (and MIN_ROUNDS are done)
# Weights streamed in one pass of a measurement: several times the largest cache, so that each weight
# comes from memory as in a decode step (a kernel that reads well from the cache is not the fastest
# from memory), and little enough that a big model is measured in a fraction of a second.
MEASURED_BYTES = max(256 * 2**20, 4 * last_level_cache_bytes())


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
        return PATHS if loop_kernel() else tuple(p for p in PATHS if p != "loop")
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


def measure(
    groups: dict[tuple, list[torch.Tensor]], paths: dict[tuple, tuple[str, ...]]
) -> tuple[dict[tuple, dict[str, float]], int]:
    """Median ms of one row through each group's weights (key: (out, in, dtype)) on each of its
    paths. A round runs every path in turn, and each path streams every group's weights once, group
    after group as a decode step does: a weight is out of the cache when it comes round again, as in
    a step, and a burst of other work on the machine hits every path. Returns ({key: {path: ms}},
    rounds)."""
    g = torch.Generator().manual_seed(0)
    order = [p for p in PATHS if any(p in ps for ps in paths.values())]
    times: dict[tuple, dict[str, list[float]]] = {key: {p: [] for p in paths[key]} for key in groups}
    with torch.inference_mode():
        xs = {key: torch.randn(1, ws[0].shape[1], generator=g).to(ws[0].dtype) for key, ws in groups.items()}
        runs = {p: {key: _runs(ws, xs[key], p) for key, ws in groups.items() if p in paths[key]} for p in order}
        for by_key in runs.values():  # warm-up: first-call allocations and kernel selection
            for calls in by_key.values():
                for call in calls:
                    call()
        start = time.perf_counter()
        for r in range(MAX_ROUNDS):
            for p in order:
                for key, calls in runs[p].items():
                    t = time.perf_counter()
                    for call in calls:
                        call()
                    times[key][p].append(time.perf_counter() - t)
            if r + 1 >= MIN_ROUNDS and time.perf_counter() - start > BUDGET_SECONDS:
                break
    ms = {key: {p: statistics.median(ts) * 1e3 for p, ts in by_path.items()} for key, by_path in times.items()}
    return ms, r + 1


def choose(groups: dict[tuple, list[torch.Tensor]], paths: dict[tuple, tuple[str, ...]]) -> dict[tuple, Choice]:
    """The fastest path for each group of same-shaped weights (key: (out, in, dtype)), among its
    `paths`; measured once per process for every group not measured yet, together."""
    threads = torch.get_num_threads()
    todo = {key: ws for key, ws in groups.items() if (*key, threads) not in CHOICES}
    if todo:
        share = MEASURED_BYTES // len(todo)
        measured = {key: _enough(ws, share) for key, ws in todo.items()}
        ms, rounds = measure(measured, {key: paths[key] for key in todo})
        for key, ws in measured.items():
            CHOICES[(*key, threads)] = Choice(key[:2], key[2], pick(ms[key]), ms[key], len(ws), rounds)
    return {key: CHOICES[(*key, threads)] for key in groups}


def _enough(weights: list[torch.Tensor], nbytes: int) -> list[torch.Tensor]:
    """The first of `weights` (contiguous) up to `nbytes` in all, at least one."""
    taken, total = [], 0
    for w in weights:
        taken.append(w.contiguous())
        total += w.nbytes
        if total >= nbytes:
            break
    return taken


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
    if path:
        choices = {key: Choice(key[:2], key[2], path) for key in groups}
    else:
        choices = choose(groups, paths)
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
