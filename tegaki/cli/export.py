"""`tegaki export`: any model tegaki can load -> a folder transformers can load."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tegaki.load import export_hf, from_pretrained, tokenizer_for


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a model as config.json + model.safetensors for transformers",
        description="Load a tegaki run folder, a transformers folder or a hub id and write it in "
        "transformers' format (with the run's tokenizer as tokenizer.json when it has one).",
    )
    p.add_argument("model", help="tegaki run folder, transformers folder, or hub id")
    p.add_argument("out", help="folder to write")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="convert the weights first (default: as loaded)",
    )
    p.set_defaults(func=_export_command)


def _export_command(args) -> int:
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = from_pretrained(args.model, dtype=dtype)
    tokenizer = None
    if (Path(args.model) / "run.json").exists():
        tokenizer = tokenizer_for(args.model)
    out = export_hf(model, args.out, tokenizer=tokenizer)
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}", file=sys.stderr)
    return 0
