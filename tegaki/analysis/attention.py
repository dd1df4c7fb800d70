"""Every head of one layer as an attention map: what `tegaki attention` draws.

The weights of one layer for one prompt, with the prompt's tokens on both axes (row = the query
token, column = the key it reads). What to look for: the causal triangle (nothing above the
diagonal), heads that look at the previous token (a bright sub-diagonal), heads that dump their
attention on the first token (the "attention sink" that GPT-OSS replaces with a learned sink
logit), and, with `--set causal=false`, the bug of a model that reads the future (the upper
triangle lights up).
"""

from __future__ import annotations

import torch

from tegaki.analysis.trace import capture, token_text
from tegaki.errors import TegakiError


def attention_maps(model, tokenizer, prompt: str, layer: int = 0) -> tuple[torch.Tensor, list[str]]:
    """(weights (H, T, T) as a float tensor, token texts) for one layer."""
    ids = tokenizer.encode(prompt)
    if ids and max(ids) >= model.config.vocab_size:
        raise TegakiError(
            f"token id {max(ids)} is outside the model's vocabulary ({model.config.vocab_size}); wrong tokenizer?"
        )
    cap = capture(model, ids, attention_layers=[layer])
    return cap.attention[layer][0], [token_text(tokenizer, i) for i in ids]


def future_attention(att: torch.Tensor) -> torch.Tensor:
    """(H,): per head, the mean weight a query puts on tokens after it; 0 for a causal model.
    The one number per head a reader checks first."""
    return att.triu(diagonal=1).sum(dim=(-1, -2)) / att.shape[-1]  # att (H, T, T) -> (H,)
