"""`tegaki tokenizer train | stats | show`: train, measure and look at tokenizers.

tegaki tokenizer train --input shakespeare --vocab-size 8000 --out runs/tok-en
tegaki tokenizer train --input ja.txt --doc-start manpage --held-out 0.2 --vocab-size 16000 --out runs/tok-ja
tegaki tokenizer stats --tokenizer runs/tok-ja --input ja.txt --doc-start manpage --held-out 0.2
tegaki tokenizer show --tokenizer gpt2 "日本語のテキスト"
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from tegaki.cli.common import default_of
from tegaki.data import TEXT_SUFFIXES, read_text_file, shakespeare_documents, shakespeare_text
from tegaki.errors import TegakiError
from tegaki.tokenizer import load
from tegaki.tokenizer.bpe import PATTERNS
from tegaki.tokenizer.choose import AUTO, choose_pattern
from tegaki.tokenizer.kinds import BACKENDS, KINDS, train_tokenizer
from tegaki.tokenizer.stats import documents_stats, format_stats
from tegaki.tokenizer.trainer import check_vocab_size

# --- reading inputs ---------------------------------------------------------------------------

LOOKS_BINARY = 1 << 20  # a NUL byte in this many leading bytes means "not a text file"


def read_input_file(path: Path, purpose: str) -> str:
    """A text file given on the command line: tegaki.data's reader, after two checks a command
    wants first (the file is there, it is not binary) and one after (it holds some text)."""
    if not path.exists():
        raise TegakiError(f"input file {path} does not exist")
    with path.open("rb") as f:
        if b"\x00" in f.read(LOOKS_BINARY):
            raise TegakiError(f"{path} looks like a binary file (it contains NUL bytes); give UTF-8 text")
    text = read_text_file(path)
    if not text.strip():
        raise TegakiError(f"{path} is empty; {purpose}")
    return text


def read_inputs(inputs: list[str], text_range: str | None = None, purpose: str = "nothing to learn from") -> list[str]:
    """Files, folders (their .txt/.md files) or the name `shakespeare` → texts, each cut to `range`."""
    texts = []
    for item in inputs:
        path = Path(item)
        if item == "shakespeare" and not path.exists():
            texts.append(shakespeare_text())
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not files:
                raise TegakiError(f"folder {path} has no {'/'.join(TEXT_SUFFIXES)} files")
            texts.extend(read_input_file(p, purpose) for p in files)
        else:
            texts.append(read_input_file(path, purpose))
    return [cut_range(t, text_range) for t in texts] if text_range else texts


# A line that starts a new document inside one text file, by name or as a regex of your own.
# "manpage": a manual page's header line, which names the page at both ends: "LS(1) User Commands LS(1)".
DOC_STARTS = {"manpage": r"^(\S+)\((\w+)\) .*\1\(\2\)$"}


def split_documents(text: str, doc_start: str | None) -> list[str]:
    """One text → its documents: cut before every line matching `doc_start` (the whole text when None)."""
    if not doc_start:
        return [text]
    try:
        start = re.compile(DOC_STARTS.get(doc_start, doc_start), re.M)
    except re.error as e:
        raise TegakiError(f"--doc-start {doc_start!r} is not a regular expression: {e}") from None
    cuts = sorted({0, *(m.start() for m in start.finditer(text))})
    return [text[a:b] for a, b in zip(cuts, [*cuts[1:], len(text)]) if text[a:b].strip()]


def read_documents(inputs: list[str], doc_start: str | None, purpose: str) -> list[str]:
    """Like `read_inputs`, but one text per document: each file, each Shakespeare play, each
    `doc_start` section of a file."""
    docs = []
    for item in inputs:
        if item == "shakespeare" and not Path(item).exists():
            docs.extend(text for _, text in shakespeare_documents())
        else:
            for text in read_inputs([item], purpose=purpose):
                docs.extend(split_documents(text, doc_start))
    return docs


def split_held_out(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): every k-th document is held out, k = 1/fraction,
    so both sides spread over the whole corpus and a rerun picks the same ones."""
    if not 0 < fraction < 1:
        raise TegakiError(f"--held-out {fraction}: expected a fraction between 0 and 1, e.g. 0.2")
    every = max(2, round(1 / fraction))
    if len(docs) < every:
        raise TegakiError(
            f"--held-out {fraction} needs at least {every} documents, found {len(docs)}; "
            "give several files or use --doc-start to say where each document starts"
        )
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    return [d for i, d in enumerate(docs) if i % every != every - 1], held


def cut_range(text: str, text_range: str) -> str:
    """'0:0.8' → the first 80% of the characters; '0.8:1' → the rest."""
    try:
        low, high = (float(x) for x in text_range.split(":"))
    except ValueError:
        raise TegakiError(f"--range {text_range!r}: expected two fractions like 0:0.8") from None
    if not 0 <= low < high <= 1:
        raise TegakiError(f"--range {text_range!r}: need 0 <= start < end <= 1")
    return text[int(low * len(text)) : int(high * len(text))]


# --- train ------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    specials = args.special_tokens
    if len(set(specials)) != len(specials) or not all(specials):
        raise TegakiError(f"--special-tokens must be distinct and non-empty, got {specials}")
    check_vocab_size(args.vocab_size)  # before the corpus is read
    texts, held = training_texts(args)
    if not any(t.strip() for t in texts):
        where = f"--range {args.range} of " if args.range else ""
        raise TegakiError(f"{where}{' '.join(args.input)} leaves no text to learn from; widen the range or add input")
    out = Path(args.out)
    pattern = args.pattern
    if args.kind == "bpe" and pattern == AUTO:
        choice = choose_pattern(texts)
        pattern = choice.pattern
        print(f"pattern {pattern}: {choice.reason} (--pattern overrides)")
    start = time.perf_counter()
    tok = train_tokenizer(
        texts,
        args.vocab_size,
        args.kind,
        pattern,
        args.backend,
        special_tokens=args.special_tokens,
        name=args.name or out.name,
        verbose=sys.stderr.isatty(),
    )
    seconds = time.perf_counter() - start
    tok.save(out)
    chars = sum(len(t) for t in texts)
    config = f"{args.kind}, pattern {pattern}" if args.kind == "bpe" else args.kind
    print(
        f"trained {tok.kind} tokenizer {tok.name!r} ({config}, vocab {tok.vocab_size:,}) on "
        f"{chars:,} characters in {seconds:.1f}s → {out}"
    )
    if held:
        total = documents_stats(tok, held).total
        print(
            f"held out {len(held)} of {len(held) + len(texts)} documents ({total.chars:,} characters): "
            f"{total.chars_per_token:.3f} characters/token"
        )
    return 0


def training_texts(args) -> tuple[list[str], list[str]]:
    """(texts to train on, held-out documents to measure on afterwards: none without --held-out)."""
    if args.held_out is None:
        return read_inputs(args.input, args.range), []
    if args.range:
        raise TegakiError("give --range or --held-out, not both: --held-out already says what to train on")
    return split_held_out(read_documents(args.input, args.doc_start, "nothing to learn from"), args.held_out)


# --- stats ------------------------------------------------------------------------------------


def cmd_stats(args) -> int:
    tok = load(args.tokenizer)
    where = " ".join(args.input)
    if args.held_out is not None:
        if args.range:
            raise TegakiError("give --range or --held-out, not both")
        docs = read_documents(args.input, args.doc_start, "nothing to measure")
        train, docs = split_held_out(docs, args.held_out)
        where += f" [the {len(docs)} held-out documents of {len(docs) + len(train)}]"
    else:
        docs = ["\n".join(read_inputs(args.input, args.range, purpose="nothing to measure"))]
        where += f" [{args.range}]" if args.range else ""
    stats = documents_stats(tok, docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    title = (
        f"{tok.name} (vocab {tok.vocab_size:,}) on {where}: {stats.total.chars:,} characters, "
        f"{n_bytes:,} bytes, {stats.total.tokens:,} tokens"
    )
    print(format_stats(stats, title))
    return 0


# --- show -------------------------------------------------------------------------------------

BACKGROUNDS = ["\033[48;5;153m", "\033[48;5;223m", "\033[48;5;194m", "\033[48;5;225m"]
RESET = "\033[0m"


def printable_piece(token: bytes) -> str:
    """A token's text, with bytes that are not whole characters shown as <e3 81>."""
    out = []
    while token:
        try:
            out.append(token.decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            out.append(token[: e.start].decode("utf-8"))
            out.append("<" + " ".join(f"{b:02x}" for b in token[e.start : e.end]) + ">")
            token = token[e.end :]
    text = "".join(out)
    return text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def use_colour(stream) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def cmd_show(args) -> int:
    tok = load(args.tokenizer)
    ids = tok.encode(args.text)
    pieces = [printable_piece(tok.token_bytes(i)) for i in ids]
    if use_colour(sys.stdout):
        print("".join(f"{BACKGROUNDS[k % len(BACKGROUNDS)]}\033[30m{p}{RESET}" for k, p in enumerate(pieces)))
    else:
        print("|".join(pieces))
    print(ids)
    # A command-line byte that is not UTF-8 arrives as a lone surrogate (Python's surrogateescape);
    # count the bytes the user actually typed.
    n_bytes = len(args.text.encode("utf-8", errors="surrogateescape"))
    print(f"{len(ids)} tokens, {len(args.text)} characters, {n_bytes} bytes")
    return 0


# --- registration -----------------------------------------------------------------------------


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {n}")
    return n


def add_held_out_arguments(p, what: str) -> None:
    p.add_argument(
        "--held-out",
        type=float,
        metavar="FRACTION",
        help=f"hold out every k-th document (k = 1/FRACTION, e.g. 0.2 → every 5th): {what}",
    )
    p.add_argument(
        "--doc-start",
        metavar="RULE",
        help="where documents start inside a file: a regex matching a document's first line, or "
        f"{', '.join(DOC_STARTS)}; default: each file (and each Shakespeare play) is a document",
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tokenizer", help="train, inspect and measure tokenizers", description="Train, inspect and measure tokenizers."
    )
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    _register_train(sub)
    _register_stats(sub)
    _register_show(sub)


def _register_train(sub) -> None:
    """`tegaki tokenizer train`: the corpus, the vocabulary and the kind of tokenizer."""
    p = sub.add_parser("train", help="train a tokenizer and save it to a folder")
    p.add_argument(
        "--input", nargs="+", required=True, help="text files, folders of .txt/.md files, or 'shakespeare' (bundled)"
    )
    p.add_argument(
        "--vocab-size",
        type=_positive_int,
        required=True,
        help="all tokens together: 256 bytes + learned tokens + special tokens",
    )
    p.add_argument("--out", required=True, help="folder to write; load it with tegaki.tokenizer.load")
    p.add_argument(
        "--kind",
        choices=KINDS,
        default=default_of(train_tokenizer, "kind"),
        help="bpe: byte-level BPE (GPT-2 style); unigram / sp-bpe: SentencePiece with byte fallback",
    )
    p.add_argument(
        "--pattern",
        choices=(AUTO, *PATTERNS),
        default=default_of(train_tokenizer, "pattern"),
        help="pre-tokenization regex (bpe); auto: gpt4 for a Japanese/CJK or mixed corpus, else gpt2",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=default_of(train_tokenizer, "backend"),
        help="bpe only: tegaki's own trainer, or the tokenizers library's (faster)",
    )
    specials = list(default_of(train_tokenizer, "special_tokens"))
    p.add_argument(
        "--special-tokens",
        nargs="*",
        default=specials,
        metavar="TOKEN",
        help=f"special tokens, each one id of its own (default: {' '.join(specials)})",
    )
    p.add_argument("--range", help="use only this fraction of each input, e.g. 0:0.8")
    add_held_out_arguments(p, "train on the other documents and report chars/token on these")
    p.add_argument("--name", help="the tokenizer's name (default: the folder name)")
    p.set_defaults(func=cmd_train)


def _register_stats(sub) -> None:
    """`tegaki tokenizer stats`: a tokenizer measured on a corpus."""
    p = sub.add_parser("stats", help="characters and bytes per token, by script")
    p.add_argument("--tokenizer", required=True, help="'gpt2' or a saved folder")
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="text files, folders of .txt/.md files, or 'shakespeare' (bundled) to measure on",
    )
    p.add_argument("--range", help="measure only this fraction of each input, e.g. 0.8:1")
    add_held_out_arguments(p, "measure only these (the ones `train --held-out` left out)")
    p.set_defaults(func=cmd_stats)


def _register_show(sub) -> None:
    """`tegaki tokenizer show`: one text cut into tokens."""
    p = sub.add_parser("show", help="show token boundaries in a text")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' (the default) or a saved folder")
    p.add_argument("text", help="the text to cut into tokens")
    p.set_defaults(func=cmd_show)
