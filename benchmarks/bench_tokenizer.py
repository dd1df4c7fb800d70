"""Tokenizers side by side: training time, held-out compression, encode throughput.

    python benchmarks/bench_tokenizer.py                 # Japanese man pages + Shakespeare, vocab 16,000
    python benchmarks/bench_tokenizer.py --vocab-size 8000 --ja path/to/ja.txt

Each corpus is cut into the first 80% (training) and the rest (held out). Compression is measured
on the held-out part; encode throughput too (CPU time, one thread, tegaki starting from an empty
chunk cache). Training time is wall-clock. The tables are Markdown, ready for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from tegaki.data import shakespeare_text
from tegaki.tokenizer import gpt2_files_dir, load
from tegaki.tokenizer.bpe import PATTERNS
from tegaki.tokenizer.spm import train_sentencepiece
from tegaki.tokenizer.trainer import train_bpe, train_bpe_tokenizers

DEFAULT_JA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ja_manpages_sec1.txt"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def best_cpu_time(n, fn, *args):
    """CPU seconds of the fastest of n runs: steadier than wall time on a shared machine, and
    the same thing for single-threaded encoders."""
    times = []
    for _ in range(n):
        start = time.process_time()
        fn(*args)
        times.append(time.process_time() - start)
    return min(times)


def tiktoken_gpt2():
    import tiktoken
    import tiktoken.load

    folder = gpt2_files_dir()
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json"))
    return tiktoken.Encoding("gpt2", pat_str=PATTERNS["gpt2"], mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def hf_from_ours(tok):
    """The `tokenizers` library running the very same vocabulary (through our export)."""
    import tempfile

    from tokenizers import Tokenizer

    from tegaki.tokenizer import export_hf_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        export_hf_tokenizer(tok, folder)
        return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


def tegaki_encoder(tok):
    def encode(text):
        tok.cache.clear()  # start cold: no chunk seen before
        return tok.encode_ordinary(text)
    return encode


def corpus_rows(label, text, vocab_size, pattern):
    cut = int(0.8 * len(text))
    train_text, held = text[:cut], text[cut:]
    held_mb = len(held.encode()) / 1e6
    rows = []

    def add(name, train_seconds, encode, threads="1"):
        ids = encode(held)
        seconds = best_cpu_time(2, encode, held)
        rows.append((name, train_seconds, len(held) / len(ids), held_mb / seconds, threads))

    gpt2 = load("gpt2")
    add("gpt2 (tegaki)", None, tegaki_encoder(gpt2))
    try:
        enc = tiktoken_gpt2()
        add("gpt2 (tiktoken)", None, enc.encode_ordinary)
    except ImportError:
        pass

    ours, t_ours = timed(train_bpe, train_text, vocab_size, pattern)
    add(f"tegaki bpe {pattern} (readable trainer)", t_ours, tegaki_encoder(ours))
    try:
        hf_run = hf_from_ours(ours)
        add("  same vocab, encoded by tokenizers", None, lambda t: hf_run.encode(t).ids)
        theirs, t_theirs = timed(train_bpe_tokenizers, train_text, vocab_size, pattern)
        hf_theirs = hf_from_ours(theirs)
        add(f"tokenizers bpe {pattern}", t_theirs, lambda t: hf_theirs.encode(t).ids, "train: 2")
    except ImportError:
        pass
    for model_type in ("unigram", "bpe"):
        sp, t_sp = timed(train_sentencepiece, train_text, vocab_size, model_type)
        add(f"sentencepiece {model_type} (byte fallback)", t_sp, sp.encode_ordinary, "train: 2")
    print(f"\n### {label}: train {len(train_text):,} chars, held out {len(held):,} chars, vocab {vocab_size:,}\n")
    print("| tokenizer | train time (s) | held-out chars/token | encode MB/s | threads |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, train_seconds, cpt, mbps, threads in rows:
        t = f"{train_seconds:.1f}" if train_seconds is not None else "–"
        print(f"| {name} | {t} | {cpt:.3f} | {mbps:.2f} | {threads} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ja", default=str(DEFAULT_JA), help="a Japanese text file")
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--pattern", default="gpt2", choices=["gpt2", "gpt4"])
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f}")
    if Path(args.ja).exists():
        corpus_rows(f"Japanese ({Path(args.ja).name})", Path(args.ja).read_text(encoding="utf-8"),
                    args.vocab_size, args.pattern)
    else:
        print(f"(skipping Japanese: {args.ja} not found)")
    corpus_rows("English (Shakespeare)", shakespeare_text(), args.vocab_size, args.pattern)


if __name__ == "__main__":
    main()
