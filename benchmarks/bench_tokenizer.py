"""Tokenizers side by side: training time, compression on unseen documents, encode throughput.

    python -m benchmarks.bench_tokenizer                 # Japanese man pages + Shakespeare, vocab 16,000
    python -m benchmarks.bench_tokenizer --vocab-size 8000 --ja path/to/ja.txt --rounds 3

Each corpus is split by *document* (a manual page, a play): every 5th document is held out, the
others are trained on, so compression is measured on text the tokenizer never saw, not on the end
of a file it learned from. Throughput is wall-clock over the held-out text, tegaki's readable
encoder starting from an empty chunk cache; each figure is the median of --rounds runs with the
range [min-max] (the machine may be shared). "2 threads" splits the text into documents and runs
tiktoken's batch encoder, as `prepare` does with its thread pool. The fast rows must give exactly the
readable encoder's ids; the script stops if they do not. The tables are Markdown for RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, command_line, cpu_text, load_average, spread
from tegaki.cli.tokenizer import split_documents, split_held_out
from tegaki.data import shakespeare_documents
from tegaki.tokenizer import gpt2_files_dir, load
from tegaki.tokenizer.bpe import PATTERNS
from tegaki.tokenizer.choose import choose_pattern
from tegaki.tokenizer.spm import train_sentencepiece
from tegaki.tokenizer.trainer import train_bpe, train_bpe_tokenizers

DEFAULT_JA = ROOT / ".." / "shared" / "data" / "ja_manpages_sec1.txt"
HELD_OUT = 0.2  # every 5th document
TOKENIZER_FLAGS = ("sse4_2", "avx", "avx2", "bmi2", "avx512f", "avx512bw")  # the CPU flags the report names


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def speeds(rounds: int, megabytes: float, fn, *args) -> list[float]:
    """MB/s of each of `rounds` runs."""
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*args)
        out.append(megabytes / (time.perf_counter() - start))
    return out


def tiktoken_gpt2():
    import tiktoken
    import tiktoken.load

    folder = gpt2_files_dir()
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json"))
    return tiktoken.Encoding(
        "gpt2", pat_str=PATTERNS["gpt2"], mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


def hf_from_ours(tok):
    """The `tokenizers` library running the very same vocabulary (through our export)."""
    import tempfile

    from tokenizers import Tokenizer

    from tegaki.tokenizer import export_hf_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        export_hf_tokenizer(tok, folder)
        return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


def readable(tok):
    def encode(docs):
        tok.cache.clear()  # start cold: no chunk seen before
        return [tok.encode_readable(d) for d in docs]

    return encode


def compiled(tok, threads: int = 1):
    enc = tok.compiled_encoder()
    if enc is None:
        return None
    if threads == 1:
        return lambda docs: [enc.encode_ordinary(d) for d in docs]
    return lambda docs: enc.encode_ordinary_batch(docs, num_threads=threads)


class Table:
    def __init__(self, held: list[str], rounds: int):
        self.held, self.rounds = held, rounds
        self.chars = sum(len(d) for d in held)
        self.megabytes = sum(len(d.encode()) for d in held) / 1e6
        self.rows = []

    def add(self, name, train_seconds, encode, threads="1", twin=None):
        """Encode the held-out documents; `twin` (another encode) must give the very same ids."""
        if encode is None:
            return
        ids = encode(self.held)
        if twin is not None and ids != twin(self.held):
            sys.exit(f"{name}: the fast encoder's ids differ from the readable encoder's")
        n_tokens = sum(len(x) for x in ids)
        mbps = speeds(self.rounds, self.megabytes, encode, self.held)
        self.rows.append((name, train_seconds, self.chars / n_tokens, mbps, threads, twin is not None))

    def print(self):
        print("| tokenizer | train time (s) | held-out chars/token | encode MB/s, median [min-max] | threads |")
        print("| --- | ---: | ---: | ---: | --- |")
        for name, train_seconds, cpt, mbps, threads, exact in self.rows:
            t = f"{train_seconds:.1f}" if train_seconds is not None else "–"
            median, low_high = spread(mbps, "{:.2f}")
            speed = f"{median} [{low_high}]"
            print(f"| {name}{' (ids = readable)' if exact else ''} | {t} | {cpt:.3f} | {speed} | {threads} |")


def gpt2_rows(table: Table) -> None:
    gpt2 = load("gpt2")
    table.add("gpt2, tegaki readable", None, readable(gpt2))
    table.add("gpt2, tegaki fast", None, compiled(gpt2), twin=readable(gpt2))
    try:
        enc = tiktoken_gpt2()
        table.add("gpt2, tiktoken", None, lambda docs: [enc.encode_ordinary(d) for d in docs])
    except ImportError:
        pass


def tegaki_bpe_rows(table: Table, train, vocab_size: int, pattern: str, label: str):
    tok, seconds = timed(train_bpe, train, vocab_size, pattern)
    table.add(f"tegaki bpe {pattern}{label}, readable", seconds, readable(tok))
    table.add(f"tegaki bpe {pattern}{label}, fast", seconds, compiled(tok), twin=readable(tok))
    table.add(f"tegaki bpe {pattern}{label}, fast", seconds, compiled(tok, 2), "2", twin=readable(tok))
    return tok


def library_rows(table: Table, train, vocab_size: int, patterns) -> None:
    try:
        for pattern in patterns:
            theirs, seconds = timed(train_bpe_tokenizers, train, vocab_size, pattern)
            hf = hf_from_ours(theirs)
            table.add(
                f"tokenizers bpe {pattern}",
                seconds,
                lambda docs, hf=hf: [e.ids for e in hf.encode_batch(docs)],
                "train 2, encode 2",
            )
    except ImportError:
        pass
    for model_type in ("unigram", "bpe"):
        sp, seconds = timed(train_sentencepiece, train, vocab_size, model_type)
        table.add(
            f"sentencepiece {model_type} (byte fallback)",
            seconds,
            lambda docs, sp=sp: [sp.encode_ordinary(d) for d in docs],
            "train 2",
        )


def corpus_rows(label: str, docs: list[str], vocab_size: int, rounds: int) -> None:
    train, held = split_held_out(docs, HELD_OUT)
    table = Table(held, rounds)
    choice = choose_pattern(train)
    gpt2_rows(table)
    tegaki_bpe_rows(table, train, vocab_size, choice.pattern, " (the default)")
    if choice.pattern != "gpt2":
        tegaki_bpe_rows(table, train, vocab_size, "gpt2", " (the old default)")
    library_rows(table, train, vocab_size, sorted({"gpt2", choice.pattern}))
    print(
        f"\n### {label}: {len(train)} documents trained on ({sum(len(d) for d in train):,} chars), "
        f"{len(held)} other documents held out ({table.chars:,} chars, {table.megabytes:.2f} MB), "
        f"vocab {vocab_size:,}\n\ndefault pattern: {choice.pattern} ({choice.reason})\n"
    )
    table.print()


def main():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--ja", default=str(DEFAULT_JA), help="a file of Japanese manual pages")
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per encoder")
    args = parser.parse_args()
    print(f"command: {command_line('bench_tokenizer')}")
    print(
        f"date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {os.cpu_count()} CPUs "
        f"({cpu_text(TOKENIZER_FLAGS)}); Python {platform.python_version()}; load average {load_average():.1f}"
    )
    if Path(args.ja).exists():
        pages = split_documents(Path(args.ja).read_text(encoding="utf-8"), "manpage")
        corpus_rows(f"Japanese manual pages ({Path(args.ja).name})", pages, args.vocab_size, args.rounds)
    else:
        print(f"(skipping Japanese: {args.ja} not found)")
    plays = [text for _, text in shakespeare_documents()]
    corpus_rows("English (Shakespeare, by play)", plays, args.vocab_size, args.rounds)


if __name__ == "__main__":
    main()
