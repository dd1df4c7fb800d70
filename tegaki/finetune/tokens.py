"""ChatML's two tokens for a model that has no chat format: the tokenizer learns them, the embedding grows.

A model with no chat template of its own (a Shakespeare run, GPT-2) is taught tegaki's default,
ChatML (tegaki.chat_template.DEFAULT_TEMPLATE). Its markers <|im_start|> and <|im_end|> become real
special tokens, as TRL's `setup_chat_format` does for transformers models:

    the tokenizer   each marker gets the next id after the tokenizer's last; it encodes to that id,
                    decodes back to its text, and no ordinary text splits into it
    the model       a row for each: a row the model has past its tokenizer (vocabularies are rounded
                    up to a multiple of 64, and those padding rows belong to no token) is used first;
                    else the embedding (and an untied LM head) grows by the rows missing, and
                    config.vocab_size with it. The run folder, `generate`, `trace` and `export` then
                    see an ordinary model whose tokenizer has two more special tokens.

The markers' rows start as the mean of the rows of the tokenizer's tokens. Read in, a marker is then an "average token";
scored out (the LM head's row), its logit is the mean of the other logits, so before training the
model gives it an ordinary, small probability and every old token keeps its logit exactly (a test
checks). A random row could instead land near some real token and take its probability. Both
markers start equal and part as soon as one of them is a target: the gradients on their rows differ.
With --method lora the base is frozen, so these rows alone of the embedding learn (tegaki.lora,
`LoRASettings.new_tokens`).
"""

from __future__ import annotations

import torch
from torch import nn

from tegaki.chat_template import DEFAULT_SPECIAL_TOKENS, DEFAULT_TEMPLATE


def needs_chat_tokens(template, tokenizer) -> bool:
    """Is this ChatML template about to be used with a tokenizer that lacks its markers?"""
    specials = getattr(tokenizer, "special_tokens", {})
    return template.source == DEFAULT_TEMPLATE and not all(t in specials for t in DEFAULT_SPECIAL_TOKENS)


def add_chat_tokens(model: nn.Module, tokenizer) -> dict[str, int]:
    """Add <|im_start|> and <|im_end|> to the tokenizer and rows for them to the model, in place.
    Returns {marker: id} for the markers added (none when the tokenizer has them already)."""
    missing = [t for t in DEFAULT_SPECIAL_TOKENS if t not in tokenizer.special_tokens]
    if not missing:
        return {}
    known = tokenizer.vocab_size  # rows past it are padding (a vocabulary rounded up to 64): no token's
    added = tokenizer.add_special_tokens(missing)  # the next ids: known, known + 1
    grow_vocab(model, max(model.config.vocab_size, tokenizer.vocab_size))
    with torch.no_grad():
        for weight in {id(w): w for w in (model.wte.weight, model.lm_head.weight)}.values():  # once when tied
            mean = weight[:known].float().mean(dim=0).to(weight.dtype)  # (C,)
            weight[list(added.values())] = mean
    return added


def grow_vocab(model: nn.Module, vocab_size: int) -> int:
    """Give the embedding and LM head `vocab_size` rows (zeros until add_chat_tokens sets them); a tied
    head stays tied. Returns the number of rows added."""
    old = model.wte.weight  # (V, C)
    added = vocab_size - old.shape[0]
    if added <= 0:
        return 0
    tied = model.lm_head.weight is old
    model.wte.weight = nn.Parameter(_grown(old, added))  # (V + n, C)
    model.wte.num_embeddings = vocab_size
    model.lm_head.weight = model.wte.weight if tied else nn.Parameter(_grown(model.lm_head.weight, added))
    model.lm_head.out_features = vocab_size
    model.config = model.config.replace(vocab_size=vocab_size)
    return added


def _grown(weight: torch.Tensor, n: int) -> torch.Tensor:
    weight = weight.detach()
    return torch.cat([weight, weight.new_zeros(n, weight.shape[1])])  # (V + n, C)
