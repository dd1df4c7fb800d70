"""The served model: loaded once, with its tokenizer, its chat template and the name clients call it by.

`tegaki serve` and `tegaki chat` both start here. --model takes what `tegaki generate` takes: a run
folder, a transformers folder or a hub id.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tegaki.chat_template import ChatTemplate, end_ids, find_chat_template, local_template_folders
from tegaki.decoding import prepare_for_decoding
from tegaki.device import pick_device
from tegaki.errors import TegakiError
from tegaki.load import from_pretrained, tokenizer_for
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
    model: str,
    *,
    name: str | None = None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    chat_template: str | None = None,
) -> Served:
    """Load --model with its tokenizer and chat template, ready for the engine, on `device` as
    tegaki.device reads it (auto: a CUDA GPU when there is one, else the CPU)."""
    device = pick_device(device)
    net = from_pretrained(model, device=device, dtype=dtype).eval()
    if quantize:
        quantize_model(net, quantize)
    prepare_for_decoding(net)  # a served model only decodes: the LM head in its decoding layout
    tokenizer = tokenizer_for(model)
    is_run = Path(model).expanduser().joinpath("run.json").is_file()
    template = find_chat_template(_template_folders(model), tokenizer, chat_template, tegaki_run=is_run)
    return Served(name or _default_name(model), net, tokenizer, template)


def _default_name(model: str) -> str:
    """runs/demo -> "demo"; a hub id stays itself ("Qwen/Qwen3-0.6B")."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def _template_folders(model: str) -> list[Path]:
    """Where a chat template may be: the folder, and a run folder's tokenizer/. For a hub id, its
    tokenizer_config.json and chat_template.jinja (downloaded when huggingface_hub is installed)."""
    if Path(model).expanduser().is_dir():
        return local_template_folders(model)
    try:
        from huggingface_hub import snapshot_download  # optional: the hub extra
    except ImportError:
        return []
    try:
        return [Path(snapshot_download(model, allow_patterns=["tokenizer_config.json", "chat_template.jinja"]))]
    except Exception as e:  # noqa: BLE001 - offline, unknown repo: the model loaded, so say what is missing
        raise TegakiError(f"could not fetch {model}'s chat template from the hub ({type(e).__name__})") from None
