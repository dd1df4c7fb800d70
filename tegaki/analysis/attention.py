"""`tegaki attention --model M "prompt" --layer L --out FILE.png`: every head of one layer as a
heatmap, with the prompt's tokens on both axes (row = the query token, column = the key it reads).

What to look for: the causal triangle (nothing above the diagonal), heads that look at the previous
token (a bright sub-diagonal), heads that dump their attention on the first token (the "attention
sink" that GPT-OSS replaces with a learned sink logit), and, with `--set causal=false`, the bug of
a model that reads the future (the upper triangle lights up).
"""

from __future__ import annotations

import argparse

from tegaki.analysis.trace import add_model_arguments, capture, load_model_and_tokenizer, token_text
from tegaki.errors import TegakiError


def attention_maps(model, tokenizer, prompt: str, layer: int):
    """(weights (H, T, T) as a float tensor, token texts) for one layer."""
    ids = tokenizer.encode(prompt)
    if ids and max(ids) >= model.config.vocab_size:
        raise TegakiError(f"token id {max(ids)} is outside the model's vocabulary ({model.config.vocab_size}); wrong tokenizer?")
    cap = capture(model, ids, attention_layers=[layer])
    return cap.attention[layer][0], [token_text(tokenizer, i) for i in ids]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attention",
        help="draw all heads of one layer as attention heatmaps (PNG)",
        description="Run one prompt and draw every head's attention weights of one layer.",
    )
    p.add_argument("prompt", help="the text to look at")
    add_model_arguments(p)
    p.add_argument("--layer", type=int, default=0, help="which layer (0 = the first)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the picture")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tegaki.analysis.plot import plot_attention_heads

    if not args.out.lower().endswith(".png"):
        raise TegakiError(f"--out {args.out}: pictures are written as PNG; give a file name ending in .png")
    model, tok, description = load_model_and_tokenizer(args.model, args.preset, args.overrides, args.tokenizer, args.seed)
    att, tokens = attention_maps(model, tok, args.prompt, args.layer)
    kind = "sliding" if model.config.window(args.layer) else "full"
    title = f"{description}, layer {args.layer} ({kind}), {att.shape[0]} heads"
    path = plot_attention_heads(att.numpy(), tokens, args.out, title=title)
    print(f"wrote {path}: {att.shape[0]} heads x {att.shape[1]} tokens")
    # The one number per head a reader checks first: how much attention falls on future tokens.
    future = att.triu(diagonal=1).sum(dim=(-1, -2)) / att.shape[-1]  # (H,)
    if float(future.max()) > 1e-6:
        print(f"warning: heads attend to future tokens (mean weight per query on the future: "
              f"{', '.join(f'{float(f):.2f}' for f in future)}) -- is causal=false?")
    return 0
