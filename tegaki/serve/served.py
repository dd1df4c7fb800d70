"""The served model: loaded once, with its tokenizer, its chat template and the name clients call it by.

`tegaki serve` and `tegaki chat` both start here. --model takes what `tegaki generate` takes: a run
folder, a transformers folder or a hub id.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from tegaki.chat_template import ChatTemplate, end_ids, find_chat_template
from tegaki.decoding import prepare_for_decoding
from tegaki.device import pick_device
from tegaki.errors import TegakiError
from tegaki.load import ModelSource
from tegaki.quant import quantize_model


@dataclass
class Served:
    """The model behind the API, and what the API needs to know about it."""

    name: str  # the id clients pass as "model"
    model: object
    tokenizer: object
    template: ChatTemplate | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context(self) -> int:
        return self.model.config.block_size

    @functools.cached_property
    def longest_token(self) -> int:
        """The most bytes one token stands for: a text of B bytes is at least B / longest_token tokens."""
        longest = 1
        for token_id in range(self.tokenizer.vocab_size):
            try:
                longest = max(longest, len(self.tokenizer.token_bytes(token_id)))
            except TegakiError:  # an id with no token (a gap in the vocabulary)
                continue
        return longest

    def end_ids(self) -> frozenset[int]:
        """Tokens that end any reply: the tokenizer's end of text (and the template's end of turn)."""
        return end_ids(self.tokenizer, self.template)


def load_served(
    model: str | ModelSource,
    *,
    name: str | None = None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    chat_template: str | None = None,
) -> Served:
    """Load --model with its tokenizer and chat template, ready for the engine, on `device` as
    tegaki.device reads it (auto: a CUDA GPU when there is one, else the CPU)."""
    source = model if isinstance(model, ModelSource) else ModelSource(model)
    net = source.load(pick_device(device), dtype).eval()
    if quantize:
        quantize_model(net, quantize)
    prepare_for_decoding(net)  # a served model only decodes: the LM head in its decoding layout
    tokenizer = source.tokenizer
    template = find_chat_template(source.template_folders(), tokenizer, chat_template, tegaki_run=source.is_run)
    return Served(name or source.short_name, net, tokenizer, template)
