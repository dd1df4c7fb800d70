"""`tegaki prepare`: tokenize a corpus into train/validation token shards (resumable)."""

from __future__ import annotations

from pathlib import Path

from tegaki.data import PIECE_CHARS, VAL_FRACTION, prepare
from tegaki.tokenizer import load


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="tokenize a corpus into train/validation token shards",
        description="Tokenize a corpus into sharded token files (resumable). "
        "--data: shakespeare, .txt/.md/.jsonl/.parquet files or folders, or a hub data set id.",
    )
    p.add_argument("--data", required=True, help="shakespeare | file | folder | hub id (owner/name)")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer folder (default: gpt2)")
    p.add_argument("--out", required=True, help="folder for the shards")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of tokens kept for validation")
    p.add_argument("--text-column", default=None, help="column holding the text in jsonl/parquet/hub data")
    p.add_argument("--workers", type=int, default=None, help="parallel tokenizer workers (default: all cores)")
    p.add_argument("--piece-chars", type=int, default=PIECE_CHARS, help="characters per shard (default 1 MiB)")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args) -> int:
    tokenizer = load(args.tokenizer)
    ref = args.tokenizer if args.tokenizer == "gpt2" else str(Path(args.tokenizer).resolve())
    result = prepare(
        args.data,
        tokenizer,
        args.out,
        tokenizer_ref=ref,
        val_fraction=args.val_fraction,
        text_column=args.text_column,
        piece_chars=args.piece_chars,
        workers=args.workers,
    )
    meta = result.meta
    speed = f" in {result.seconds:.1f}s ({result.mb_per_s:.1f} MB/s)" if result.seconds else " (already prepared)"
    print(
        f"{args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} validation tokens "
        f"({meta['dtype']}){speed}"
    )
    return 0
