"""How well a model predicts text: perplexity and bits per byte (sliding window); response loss on records.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the text rather than by its
tokens, so models with different tokenizers can be compared on the same file (nanochat reports it).

A text longer than the model's context is scored in windows of `window` tokens that move by `stride`:
each token is scored once, in the first window where it is among the last `stride` positions, so it
sees at least window - stride tokens of context (transformers' perplexity guide does the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tegaki.errors import TegakiError
from tegaki.finetune.data import (
    IGNORE,
    PackedRows,
    describe_too_long,
    encode_records,
    read_records,
)


@dataclass
class TextScore:
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text
    nll: float  # summed negative log-likelihood, nats

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes)


def model_context(model) -> int:
    """The longest input the model takes: its block_size (learned positions or the trained length)."""
    return int(model.config.block_size)


@torch.no_grad()
def token_logprobs(model, ids: list[int], window: int | None = None, stride: int | None = None) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1 .. len(ids) - 1, scored with a sliding window: (len(ids) - 1,)."""
    context = model_context(model)
    window = context if window is None else window  # 0 is a mistake, not "the default"
    if not 0 < window <= context:
        raise TegakiError(f"--window must be between 1 and the model's context ({context}), got {window}")
    stride = max(1, window // 2) if stride is None else stride
    if not 0 < stride <= window:
        raise TegakiError(f"--stride must be between 1 and the window ({window}), got {stride}")
    device = next(model.parameters()).device
    out = torch.empty(len(ids) - 1, dtype=torch.float64)
    scored = 1  # ids[0] has no context: it is never a target
    while scored < len(ids):
        end = min(scored + stride, len(ids))
        start = max(0, end - window - 1)  # window inputs + the first target's context
        chunk = torch.tensor(ids[start:end], device=device)[None]  # (1, n)
        logits = model(chunk[:, :-1]).float()  # (1, n-1, V): logits[t] predicts chunk[t+1]
        logp = F.log_softmax(logits, dim=-1)[0].gather(-1, chunk[0, 1:, None])[:, 0]  # (n-1,)
        new = end - scored  # the targets not scored by an earlier window
        out[scored - 1 : end - 1] = logp[-new:].double().cpu()
        scored = end
    return out


def score_text(model, tokenizer, text: str, window: int | None = None, stride: int | None = None) -> TextScore:
    """Perplexity and bits per byte of `text`. The end-of-text token goes first, so that every token of
    the text itself is predicted (and every byte counted)."""
    if not text:
        raise TegakiError("the text is empty")
    # Without an end-of-text token the first token has no context and is not scored (its bytes still count).
    start = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    logp = token_logprobs(model, start + tokenizer.encode_ordinary(text), window, stride)
    return TextScore(tokens=len(logp), bytes=len(text.encode("utf-8")), nll=float(-logp.sum()))


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TegakiError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TegakiError(f"{path}: not UTF-8 text (byte {e.start})") from None


@dataclass
class ResponseScore:
    records: int
    tokens: int  # response tokens scored
    loss: float  # mean nats per response token
    note: str | None  # records left out as too long, in words


@torch.no_grad()
def score_records(model, tokenizer, template, path: str | Path, max_seq_len: int, batch_size: int = 8) -> ResponseScore:
    """The mean loss on the response tokens of instruction records (prompts masked, as fine-tuning
    learns them): the figure that shows whether a fine-tune taught its held-out responses."""
    records = read_records(path)
    if max_seq_len < 2:
        raise TegakiError(f"--max-seq-len must be at least 2, got {max_seq_len}")
    # A row is at most the model's context: no input longer than that can be scored (nor allocated for nothing).
    max_seq_len = min(max_seq_len, model_context(model))
    encoded = encode_records(records, template, tokenizer, max_seq_len)
    if not encoded.pairs:
        raise TegakiError(f"{path}: no record fits in --max-seq-len {max_seq_len} (at most the model's context)")
    pad = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    rows = PackedRows(encoded.pairs, max_seq_len, pad)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for first in range(0, len(rows), batch_size):
        inputs, targets = rows.batch(range(first, min(first + batch_size, len(rows))))
        logits = model(inputs.to(device)).float()  # (B, T, V)
        targets = targets.to(device)
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"))
        count += int((targets != IGNORE).sum())
    return ResponseScore(len(encoded.pairs), count, total / count, describe_too_long(encoded, max_seq_len))
