"""The contestants of a decoding race, and its rounds: bench_generate's, bench_matvec's and bench_gpu's.

A contestant is one engine's greedy decoding as a function (prompt ids (B, T), new tokens) -> (the
new tokens of each row; the seconds of the call), so that the jobs, the timing and the token checks
are the same code for every engine. The benchmark's own contestants run in worker processes
(engines.py), which time each call themselves; bench_gpu's host rows run in its own process.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import ROOT, load_average, module_command
from benchmarks.engines import (
    Worker,
    engine_available,
    llama_cpp_converter,
    make_gguf,
    prepare_tegaki,
    tegaki_generator,
    transformers_generator,
)
from tegaki.config import ModelConfig
from tegaki.model import GPT

JOBS = ("batch 1", "prefill", "batch 8")
GPT2_VOCAB = 50257  # GPT-2's tokenizer's ids, which llama.cpp's converter reads the vocabulary from

# --- the contestants ----------------------------------------------------------------------------

Run = Callable[[torch.Tensor, int], tuple[list[list[int]], float]]


@dataclass
class Contestant:
    name: str
    run: Run
    precision: str = "fp32"  # of the weights: which ceiling a row is set against
    jobs: tuple[str, ...] = JOBS
    worker: Worker | None = None


def worker_contestant(name: str, spec: dict, precision: str, jobs: tuple[str, ...] = JOBS) -> Contestant:
    """A contestant in a worker process of its own, started now and loaded before the next starts:
    tegaki measures its decoding paths as it loads, which other engines loading beside it would
    disturb (a choice made on busy cores is kept for the whole run)."""
    worker = Worker(spec)
    worker.ready()
    return Contestant(name, lambda ids, new: worker(ids.tolist(), new), precision, jobs, worker)


def timed(generator: Callable[[list[list[int]], int], list[list[int]]]) -> Run:
    """A generator of this process as a contestant's run: its tokens, and the seconds of the call."""

    def run(ids, new):
        t = time.perf_counter()
        tokens = generator(ids.tolist(), new)
        return tokens, time.perf_counter() - t

    return run


def transformers_contestant(name: str, model) -> Contestant:
    """transformers in this process (bench_gpu's host rows); bench_generate runs it in a worker."""
    return Contestant(name, timed(transformers_generator(model)))


def tegaki_contestant(name: str, model: GPT, compile: bool) -> Contestant:
    """tegaki in this process, prepared as its default decodes (bench_gpu's host rows)."""
    run = timed(tegaki_generator(prepare_tegaki(model, None), compile))
    return Contestant(name, run, jobs=("batch 1",) if compile else JOBS)


def left_out(note: str, notes: list[str] | None) -> list[Contestant]:
    """No contestants, and the note that says why: on stderr now, and in the report's notes."""
    print(f"note: {note}", file=sys.stderr)
    if notes is not None:
        notes.append(note)
    return []


def ctranslate2_available() -> bool:
    return engine_available("ctranslate2")


def ctranslate2_contestants(
    hf_folder: str, out_folder: str, vocab_size: int, threads: int, notes: list[str] | None = None
) -> list[Contestant]:
    """CTranslate2 fp32 and int8 from the transformers folder (converted in a process of its own too);
    none, with a note, without ctranslate2."""
    if not ctranslate2_available():
        return left_out("ctranslate2 is not installed (pip install ctranslate2): its rows are left out", notes)
    convert = module_command("engines", "--ct2-convert", hf_folder, out_folder, str(vocab_size))
    subprocess.run(convert, cwd=ROOT, check=True)
    contestants = []
    for precision, compute_type in (("fp32", "float32"), ("int8", "int8")):
        spec = {"engine": "ctranslate2", "folder": out_folder, "compute_type": compute_type, "threads": threads}
        contestants.append(worker_contestant(f"CTranslate2 {precision}", spec, precision))
    return contestants


def llama_cpp_contestants(
    hf_folder: str, out_folder: Path, config: ModelConfig, threads: int, source: str | None, notes: list[str]
) -> list[Contestant]:
    """llama.cpp f32 and q8_0, from GGUF files its own converter makes of the transformers folder;
    none, with a note, without llama-cpp-python or where the folder has no tokenizer the converter
    reads. llama-cpp-python's Llama decodes one sequence, so these rows run batch 1 and the prefill."""
    if not engine_available("llama_cpp"):
        return left_out(
            "llama-cpp-python is not installed (pip install llama-cpp-python): its rows are left out", notes
        )
    if config.vocab_size < GPT2_VOCAB:
        return left_out(
            f"llama.cpp's rows are left out: its converter reads the vocabulary from a tokenizer, and "
            f"GPT-2's ({GPT2_VOCAB:,} ids) does not fit this model's {config.vocab_size:,}",
            notes,
        )
    converter = llama_cpp_converter(source)
    out_folder.mkdir(parents=True, exist_ok=True)
    ggufs = {outtype: make_gguf(converter, hf_folder, out_folder, outtype) for outtype in ("f32", "q8_0")}
    contestants = []
    for outtype, precision in (("f32", "fp32"), ("q8_0", "int8")):
        spec = {"engine": "llama.cpp", "gguf": str(ggufs[outtype]), "n_ctx": config.block_size, "threads": threads}
        contestants.append(worker_contestant(f"llama.cpp {outtype}", spec, precision, ("batch 1", "prefill")))
    notes.append("llama.cpp runs batch 1 and the prefill: llama-cpp-python's Llama holds one sequence.")
    return contestants


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
                tokens, seconds = c.run(job.ids, job.new)
                rows[job.name, c.name] = Row([], [], tokens, first_call=seconds)
    for r in range(rounds):
        for job in jobs:
            for c in contestants:
                if job.name not in c.jobs:
                    continue
                tokens, seconds = c.run(job.ids, job.new)
                row = rows[job.name, c.name]
                row.rates.append(job.rate(tokens, seconds))
                row.seconds.append(seconds)
                row.tokens = tokens
        print(f"round {r + 1}/{rounds} done, load average {load_average():.1f}", file=sys.stderr, flush=True)
    return rows


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[int, int, int]:
    """Greedy tokens against the reference's, summed over rows: (how many are repeated before the
    first difference, how many are equal position by position, how many the reference has). After
    one near tie flips, two greedy runs usually part ways for good; positions equal after it say
    whether they found their way back."""
    prefix = same = total = 0
    for row, ref in zip(tokens, reference):
        pairs = list(zip(row, ref))
        prefix += next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
        same += sum(a == b for a, b in pairs)
        total += len(ref)
    return prefix, same, total


def ratios(row: Row, reference: Row) -> list[float]:
    """A row's rate over the reference's, round by round: the two ran seconds apart in each round, so
    a burst of other work moves both."""
    return [a / b for a, b in zip(row.rates, reference.rates)]
