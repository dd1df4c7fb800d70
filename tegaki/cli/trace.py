"""`tegaki trace "Hello, I am"`: follow one prompt through the five steps of a forward pass."""

from __future__ import annotations

import argparse
import json

from tegaki.analysis.trace import PRESET_TOKENIZER, format_trace, load_model_and_tokenizer, trace
from tegaki.cli.common import default_of
from tegaki.cli.options import add_model_arguments
from tegaki.device import DTYPES, pick_device, pick_dtype
from tegaki.errors import TegakiError


def add_model_or_preset_arguments(p: argparse.ArgumentParser) -> None:
    """The model to look into: --model (with --device and --dtype), or --preset with random weights
    (--set, --tokenizer, --seed). Shared with `tegaki attention`."""
    add_model_arguments(p, required=False, quantize=False, dtype_default="fp32")  # fp32: these are measurements
    p.add_argument("--preset", help="a preset with random weights instead of a trained model")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a preset's config field (repeatable)",
    )
    p.add_argument(
        "--tokenizer", help=f"tokenizer name or folder (default: the model's own, or {PRESET_TOKENIZER} for a preset)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=default_of(load_model_and_tokenizer, "seed"),
        help="seed of a preset's random weights",
    )


def load_model(args: argparse.Namespace):
    """(model, tokenizer, description) from the flags of `add_model_or_preset_arguments`, on --device in --dtype."""
    device = pick_device(args.device)
    model, tok, description = load_model_and_tokenizer(
        args.model, args.preset, args.overrides, args.tokenizer, args.seed
    )
    return model.to(device=device, dtype=DTYPES[pick_dtype(args.dtype, device)]), tok, description


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "trace",
        help="follow one prompt through the five steps of a forward pass",
        description="Show the tokens, embeddings, each block's attention and MLP output, one head's "
        "attention pattern, the logits and the top next tokens for one prompt.",
    )
    p.add_argument("prompt", help='the text to trace, e.g. "Hello, I am"')
    add_model_or_preset_arguments(p)
    p.add_argument(
        "--layer", type=int, default=default_of(trace, "layer"), help="layer whose attention pattern to show"
    )
    p.add_argument(
        "--head",
        type=int,
        default=default_of(trace, "head"),
        help="head whose attention pattern to show (default: the one with the highest previous-token score)",
    )
    p.add_argument("--top", type=int, default=default_of(trace, "top_k"), help="how many next tokens to list")
    p.add_argument("--json", action="store_true", help="print the trace as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.top < 1:  # checked before the (slow) load
        raise TegakiError(f"--top must be at least 1, got {args.top}")
    model, tok, description = load_model(args)
    result = trace(model, tok, args.prompt, layer=args.layer, head=args.head, top_k=args.top)
    if args.json:
        print(json.dumps(dict(result, model=description), indent=1, ensure_ascii=False))
    else:
        print(format_trace(result, description))
    return 0
