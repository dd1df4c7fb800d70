"""Where a float32 decode step's time goes: the matrix-vector kernels, and the step around them.

    python -m benchmarks.bench_matvec                       # 7 rounds, a few minutes on 2 cores
    LD_LIBRARY_PATH=/path/lib python -m benchmarks.bench_matvec --dnnl /path/lib/libdnnl.so.3 --compile

Decoding one token multiplies one vector by each of GPT-2 124M's 49 weight matrices (c_attn, c_proj,
c_fc, c_proj x 12, and the LM head: 494 MB in float32). This asks two questions, in one run, on
those shapes (random weights: speed does not depend on the values):

1. The kernels. How fast does each float32 matrix-vector kernel within PyTorch's reach read the
   weights, beside reading every weight once with nothing else to do (a sum: the ceiling)?
     F.linear        the plain weights, PyTorch's default BLAS (what nn.Linear and transformers call;
                     the decoding layer's "plain" path)
     oneDNN          `_linear_pointwise` on the weight as it is (the "onednn" path)
     oneDNN packed   the same kernel on a copy in oneDNN's layout (the "packed" path)
     compiled        `(x * W).sum(-1)` through torch.compile (inductor's own C++ loop, what a compiled
                     decode step runs: FastLinear.forward_matvec), one call for all 49, --compile
     dnnl_sgemm      oneDNN's BLAS-style sgemm, which CTranslate2 multiplies with on CPUs where it
                     does not use MKL, called through ctypes from a libdnnl given with --dnnl (the
                     `onednn` wheel and its runtime libraries; PyTorch's own copy hides the symbol)
2. The step. CTranslate2's whole float32 decoding (in a worker process, as in bench_generate)
   against tegaki's 49 matrix-vector products alone (each on the path measured fastest), back to
   back, and tegaki's whole eager step (and, with --compile, its compiled step), all per token of a
   32-token prompt + 128 greedy tokens.

Every candidate runs once per round, in turn; a figure is the median over rounds and its range.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import statistics
import tempfile
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import (
    RESULTS,
    best_of,
    command_line,
    finish,
    interleaved_seconds,
    load_average,
    machine_text,
    spread,
)
from benchmarks.contestants import ctranslate2_available, ctranslate2_contestants
from benchmarks.engines import linear_weights
from tegaki.config import ModelConfig
from tegaki.decoding import FastLinear, prepare_for_decoding
from tegaki.generate import generate
from tegaki.kv_cache import KVCache
from tegaki.load import export_hf
from tegaki.model import GPT

PROMPT, NEW = 32, 128
COPY_BYTES = 256 * 2**20


def copy_run():
    """A 256 MiB copy, beyond every cache: bandwidth as bytes read + written."""
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def kernel_runs(weights: list[torch.Tensor], dnnl: str | None, compile: bool) -> dict[str, Callable[[], None]]:
    """One token through the 49 matrices by each kernel (no bias: the same bytes for all)."""
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    runs: dict[str, Callable[[], None]] = {}

    def mkl():
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    def onednn():
        for w in weights:
            torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], w, None, "none", [], "")

    def onednn_packed():
        for w, p in zip(weights, packed):
            torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")

    runs['F.linear, plain weights (tegaki\'s "plain" path)'] = mkl
    runs['oneDNN on the weight ("onednn")'] = onednn
    runs['oneDNN packed copy ("packed")'] = onednn_packed
    if compile:
        inputs = [xs[w.shape[1]] for w in weights]
        runs["compiled dot products (inductor's loop)"] = lambda: chained_products(inputs, weights)
    if dnnl:
        runs["dnnl_sgemm (oneDNN's sgemm, via ctypes)"] = dnnl_run(dnnl, weights, xs)
    everything = torch.cat([w.flatten() for w in weights])
    runs["ceiling: read every weight once (a sum)"] = lambda: everything.sum()
    return runs


@torch.compile(dynamic=False)
def chained_products(xs: list[torch.Tensor], ws: list[torch.Tensor]) -> torch.Tensor:
    """FastLinear.forward_matvec's formula for all 49 matrices in one compiled call (no per-call
    entry into a compiled function to time). Each input takes a zero-weighted term of the previous
    output, so that, as in a decode step where each layer reads the one before, every product is a
    loop of its own; independent, inductor would fuse all 49 into one kernel."""
    y = None
    for x, w in zip(xs, ws):
        if y is not None:
            x = x + 0.0 * y[:, :1]
        y = (x[:, None, :] * w).sum(-1)
    return y


def dnnl_run(path: str, weights: list[torch.Tensor], xs: dict[int, torch.Tensor]) -> Callable[[], None]:
    """y (1, N) = x (1, K) @ W^T with W (N, K) row-major: dnnl_sgemm('N', 'T', M=1, N, K, ...)."""
    try:
        sgemm = ctypes.CDLL(path).dnnl_sgemm
    except (OSError, AttributeError) as e:
        raise SystemExit(
            f"--dnnl {path}: {e} (the libraries it needs, tbb and the others, go on LD_LIBRARY_PATH)"
        ) from None
    i64, ptr, f32, char = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_char
    sgemm.argtypes = [char, char, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64]
    ys = {w.shape[0]: torch.empty(1, w.shape[0]) for w in weights}

    def product(w: torch.Tensor) -> torch.Tensor:
        n, k = w.shape
        x, y = xs[k], ys[n]
        sgemm(b"N", b"T", 1, n, k, 1.0, x.data_ptr(), k, w.data_ptr(), k, 0.0, y.data_ptr(), n)
        return y

    def run():
        for w in weights:
            product(w)

    w = weights[0]
    torch.testing.assert_close(product(w), F.linear(xs[w.shape[1]], w), rtol=1e-4, atol=1e-5)  # the call is right
    return run


def step_runs(base: GPT, threads: int, with_ct2: bool, compile: bool) -> dict[str, Callable[[], None]]:
    """Per call: PROMPT + NEW greedy tokens (CTranslate2, tegaki), or NEW times the 49 products."""
    cfg = base.config
    ids = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    runs: dict[str, Callable[[], None]] = {}
    if with_ct2:
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(base, f"{tmp}/transformers")
            ct2 = ctranslate2_contestants(f"{tmp}/transformers", f"{tmp}/ct2", cfg.vocab_size, threads)[0]
        runs["CTranslate2 fp32, whole decoding"] = lambda: ct2.run(ids, NEW)
    model = prepare_for_decoding(base)
    layers = [m for m in model.modules() if isinstance(m, FastLinear)]
    xs = {layer.in_features: torch.randn(1, 1, layer.in_features) for layer in layers}

    def products():
        with torch.inference_mode():
            for _ in range(NEW):
                for layer in layers:
                    layer(xs[layer.in_features])

    def eager():
        with torch.inference_mode():
            cache = KVCache(cfg, 1, PROMPT + NEW)
            token = model(ids, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
            for _ in range(NEW - 1):
                token = model(token, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)

    runs[f"tegaki: the {len(layers)} products alone (measured paths)"] = products
    runs["tegaki fp32, whole eager decoding"] = eager
    if compile:  # generate's compiled step: forward_matvec for every layer, the prompt eager
        runs["tegaki fp32, whole compiled decoding"] = lambda: generate(model, ids, NEW, temperature=0, compile=True)
    return runs


PAUSE = 0.5  # seconds between two runs: the threads of one (another process's too) go idle first


def rounds_of(
    runs: dict[str, Callable[[], None]], rounds: int, per_call: int, repeat: int = 1
) -> dict[str, list[float]]:
    """ms per token of each run (per_call tokens a call, `repeat` calls a round), once per round, in
    turn, after a warm-up."""
    for fn in runs.values():
        fn()
    seconds = interleaved_seconds(runs, rounds, repeat=repeat, pause=PAUSE)
    return {name: [t / per_call * 1e3 for t in ts] for name, ts in seconds.items()}


def table_rows(times: dict[str, list[float]], more: Callable[[list[float]], str] = lambda values: "") -> list[str]:
    """| label | median ms | range |, and whatever `more` adds, a row per run."""
    rows = []
    for label, values in times.items():
        median, low_high = spread(values, "{:.2f}")
        rows.append(f"| {label} | {median} | {low_high} |" + more(values))
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_matvec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--preset", default="gpt2", help="the model's shapes (default gpt2: GPT-2 124M)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads (default: torch's)")
    parser.add_argument("--dnnl", metavar="LIBDNNL", help="a libdnnl.so to time oneDNN's dnnl_sgemm from")
    parser.add_argument("--compile", action="store_true", help="also time inductor's loop and the compiled step")
    parser.add_argument("--no-ct2", action="store_true", help="leave CTranslate2 out of the step comparison")
    parser.add_argument(
        "--append-results",
        metavar="PATH",
        nargs="?",
        const=str(RESULTS),
        help="add the report to the end of PATH (default benchmarks/RESULTS.md)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line("bench_matvec", argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    load = load_average()

    torch.manual_seed(0)
    base = GPT(ModelConfig.preset(args.preset)).eval()
    weights = [w.detach() for w in linear_weights(base)]
    mb = sum(w.numel() * 4 for w in weights) / 1e6
    copy = copy_run()
    best_copy = best_of(copy, 30)

    kernels = rounds_of(kernel_runs(weights, args.dnnl, args.compile), args.rounds, per_call=1, repeat=20)
    with_ct2 = not args.no_ct2 and ctranslate2_available()
    steps = rounds_of(step_runs(base, args.threads, with_ct2, args.compile), args.rounds, per_call=NEW)

    lines = [
        f"## float32 matrix-vector kernels and the decode step ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{command}`. {machine_text()}; load average {load:.1f} at the start. {args.rounds} "
        "interleaved rounds, median (range).",
        "",
        f"Preset {args.preset}: its {len(weights)} weight matrices, one token ({mb:.0f} MB of float32 "
        f"weights); copy bandwidth {2 * COPY_BYTES / best_copy / 1e9:.1f} GB/s (best of 30):",
        "",
        "| kernel | ms per token | range | GB/s of weights read |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += table_rows(kernels, lambda values: f" {mb / statistics.median(values):.1f} |")
    lines += [
        "",
        f"The decode step, per token of a {PROMPT}-token prompt and {NEW} greedy tokens"
        + ("" if with_ct2 else " (CTranslate2 not installed: its row is left out)")
        + ":",
        "",
        "| run | ms per token | range |",
        "| --- | ---: | ---: |",
    ]
    lines += table_rows(steps)
    lines += ["", f"Load average at the end: {load_average():.1f}."]
    return finish(lines, args.append_results)


if __name__ == "__main__":
    main()
