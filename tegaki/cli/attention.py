"""`tegaki attention --model M "prompt" --layer L --out FILE.png`: every head of one layer as a heatmap."""

from __future__ import annotations

import argparse

from tegaki.analysis.attention import attention_maps, future_attention
from tegaki.analysis.plot import plot_attention_heads
from tegaki.cli.common import default_of
from tegaki.cli.trace import add_model_or_preset_arguments, load_model
from tegaki.errors import TegakiError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attention",
        help="draw all heads of one layer as attention heatmaps (PNG)",
        description="Run one prompt and draw every head's attention weights of one layer.",
    )
    p.add_argument("prompt", help="the text to look at")
    add_model_or_preset_arguments(p)
    p.add_argument("--layer", type=int, default=default_of(attention_maps, "layer"), help="which layer (0 = the first)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the picture")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.out.lower().endswith(".png"):
        raise TegakiError(f"--out {args.out}: pictures are written as PNG; give a file name ending in .png")
    model, tok, description = load_model(args)
    att, tokens = attention_maps(model, tok, args.prompt, args.layer)
    kind = "sliding" if model.config.window(args.layer) else "full"
    title = f"{description}, layer {args.layer} ({kind}), {att.shape[0]} heads"
    path = plot_attention_heads(att.numpy(), tokens, args.out, title=title)
    print(f"wrote {path}: {att.shape[0]} heads x {att.shape[1]} tokens")
    future = future_attention(att)  # (H,)
    if float(future.max()) > 1e-6:
        print(
            f"warning: heads attend to future tokens (mean weight per query on the future: "
            f"{', '.join(f'{float(f):.2f}' for f in future)}) -- is causal=false?"
        )
    return 0
