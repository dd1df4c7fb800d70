"""Instruction records -> token rows whose loss counts only the responses.

A record is one line of a .jsonl file, in either of two shapes:

    Alpaca  {"instruction": "...", "input": "..." (optional), "output": "..."}
    chat    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

An Alpaca record is the chat [user: instruction (+ blank line + input), assistant: output]. The model's
chat template (tegaki.chat_template: the checkpoint's own, ChatML, or the plain "USER:/ASSISTANT:"
layout for a tegaki run) writes the conversation out. Each assistant turn is cut where the template
hands over to the assistant: the text before is the prompt, the text after is the response, and they
are tokenized apart -- exactly as the prompt will be tokenized when the model is asked later. A message
whose text spells one of the tokenizer's special tokens ("<|im_end|>") is refused with its line number:
tokenized with the template's text, it would become the token itself and end the turn early.

Labels: the token the model should predict at each place, or -100 where it should learn nothing
(the prompt, the padding): the model's loss ignores -100, so only the responses are learned. Each
record ends with the end-of-text token, which is learned too: the model learns to stop.

Batches: records are packed, longest first, into rows of --max-seq-len + 1 tokens (first fit), so few
tokens are padding. Records in one row can see each other through attention, as in TRL's packing;
the end-of-text token between them marks where one ends. A record longer than a row is reported by
its line number and left out, never cut mid-answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tegaki.data import json_lines
from tegaki.errors import TegakiError

IGNORE = -100  # the label of a token that is not learned (F.cross_entropy's ignore_index)
ROLES = ("system", "user", "assistant")
# The bundled instruction set (instructions/README.md), by the names --data takes for it.
BUNDLED = {
    "instructions": Path(__file__).parent / "instructions" / "train.jsonl",
    "instructions-heldout": Path(__file__).parent / "instructions" / "heldout.jsonl",
}


def records_path(name: str | Path) -> Path:
    """A bundled set's file for its name ("instructions"), or the path itself."""
    return BUNDLED.get(str(name), Path(name))


@dataclass
class Record:
    """One conversation and where it came from."""

    line: int  # 1-based line number in the file
    messages: list[dict]


# -------------------------------------------------------------------------------------------------
# Reading records
# -------------------------------------------------------------------------------------------------


def read_json_lines(path: str | Path) -> list[tuple[int, str, object]]:
    """data.json_lines, read whole: (line number, "FILE:N", value) per line. A line nested deeper
    than Python's JSON reader follows (100,000 brackets) is refused, naming the line, like any
    other bad line: no record or task is that deep."""
    lines: list[tuple[int, str, object]] = []
    try:
        for line in json_lines(path):
            lines.append(line)
    except RecursionError:
        after = f"after line {lines[-1][0]}" if lines else "from the first line on"
        raise TegakiError(
            f"{path}: a line {after} is JSON nested too deep to read; a record is an object of texts"
        ) from None
    return lines


def read_records(path: str | Path) -> list[Record]:
    """Every record of a .jsonl file (or a bundled set's name) as a conversation; a bad line is a
    TegakiError naming it."""
    path = records_path(path)
    records = []
    for number, where, obj in read_json_lines(path):
        records.append(Record(number, to_messages(obj, where)))
    if not records:
        raise TegakiError(f"{path} holds no records (one JSON object per line)")
    return records


def to_messages(obj, where: str) -> list[dict]:
    """An Alpaca or chat record as a list of {"role", "content"} messages, checked."""
    if not isinstance(obj, dict):
        raise TegakiError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return _checked_messages(obj["messages"], where)
    missing = [k for k in ("instruction", "output") if not isinstance(obj.get(k), str)]
    if missing:
        raise TegakiError(
            f"{where}: missing {' and '.join(repr(k) for k in missing)} (an Alpaca record needs "
            '"instruction" and "output" strings; a chat record needs "messages")'
        )
    extra = obj.get("input") or ""
    if not isinstance(extra, str):
        raise TegakiError(f'{where}: "input" must be a string')
    prompt = obj["instruction"] + (f"\n\n{extra}" if extra else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]


def _checked_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise TegakiError(f'{where}: "messages" must be a non-empty list')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise TegakiError(f'{where}: message {i} needs a "content" string')
        if m.get("role") not in ROLES:
            raise TegakiError(f"{where}: message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise TegakiError(f"{where}: no assistant message, so nothing to learn")
    return out


# -------------------------------------------------------------------------------------------------
# Tokens and labels
# -------------------------------------------------------------------------------------------------


def encode_record(record: Record, template, tokenizer) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one conversation: labels are the ids on assistant replies (and the
    final end-of-text), IGNORE elsewhere."""
    _refuse_spelled_specials(record, tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the text already turned into tokens
    for i, message in enumerate(record.messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(record.messages[:i], add_generation_prompt=True)
        full = template.render(record.messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise TegakiError(
                f"line {record.line}: the chat template ({template.origin}) does not write a "
                "conversation as a prompt followed by its reply; it cannot mark the responses"
            )
        prompt_ids = tokenizer.encode(prompt[len(done) :])
        reply_ids = tokenizer.encode(full[len(prompt) :])
        ids += prompt_ids + reply_ids
        labels += [IGNORE] * len(prompt_ids) + reply_ids
        done = full
    eot = tokenizer.eot_id
    if eot is not None:
        ids.append(eot)
        labels.append(eot)
    return ids, labels


def _refuse_spelled_specials(record: Record, tokenizer) -> None:
    """A message that spells a special token ("<|im_end|>" in its text) would become that token once
    the template's text is tokenized, and end a turn the record never ended: refused, with its line."""
    for i, message in enumerate(record.messages):
        spelled = [s for s in getattr(tokenizer, "special_tokens", {}) if s in message["content"]]
        if spelled:
            raise TegakiError(
                f"line {record.line}: message {i} spells the special token {spelled[0]} in its text, which "
                "would be read as the token itself; write it otherwise (e.g. with a space inside it)"
            )


@dataclass
class Encoded:
    """The records that fit, as (ids, labels) pairs, and the line numbers of those that did not."""

    pairs: list[tuple[list[int], list[int]]]
    too_long: list[int]
    longest: int


def encode_records(records: list[Record], template, tokenizer, max_seq_len: int) -> Encoded:
    """Encode every record; those over max_seq_len + 1 tokens are set aside (reported, not cut)."""
    pairs, too_long, longest = [], [], 0
    for record in records:
        ids, labels = encode_record(record, template, tokenizer)
        longest = max(longest, len(ids))
        if len(ids) > max_seq_len + 1:  # a row holds T inputs and, shifted by one, T targets
            too_long.append(record.line)
        elif any(label != IGNORE for label in labels[1:]):
            pairs.append((ids, labels))
    return Encoded(pairs, too_long, longest)


def describe_too_long(encoded: Encoded, max_seq_len: int) -> str | None:
    """A sentence about the records left out, or None when all fit."""
    if not encoded.too_long:
        return None
    lines = ", ".join(map(str, encoded.too_long[:10])) + (" ..." if len(encoded.too_long) > 10 else "")
    return (
        f"{len(encoded.too_long)} record(s) longer than --max-seq-len {max_seq_len} were left out "
        f"(lines {lines}; the longest is {encoded.longest} tokens): raise --max-seq-len or shorten them"
    )


# -------------------------------------------------------------------------------------------------
# Packing into rows
# -------------------------------------------------------------------------------------------------


class PackedRows:
    """Records packed into rows of block_size + 1 tokens, with the same interface as
    tegaki.data.TokenWindows (len, batch(indices), block_size, tokens), so the training loop's
    BatchLoader and validation_batches use them unchanged."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], block_size: int, pad_id: int):
        self.block_size = block_size
        width = block_size + 1
        rows = pack(pairs, width)
        self.ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        self.labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
        for r, members in enumerate(rows):
            at = 0
            for k in members:
                ids, labels = pairs[k]
                self.ids[r, at : at + len(ids)] = ids
                self.labels[r, at : at + len(ids)] = labels
                at += len(ids)
        self.tokens = int(sum(len(ids) for ids, _ in pairs))
        self.response_tokens = int((self.labels[:, 1:] != IGNORE).sum())

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, T): targets are the labels shifted by one, as in pre-training."""
        rows = np.asarray(list(indices), dtype=np.int64)
        inputs = torch.from_numpy(self.ids[rows, :-1].copy())  # (B, T)
        targets = torch.from_numpy(self.labels[rows, 1:].copy())  # (B, T): -100 where nothing is learned
        return inputs, targets


def pack(pairs: list[tuple[list[int], list[int]]], width: int) -> list[list[int]]:
    """First-fit decreasing: each record, longest first, goes into the first row with room.
    Returns each row's record indices. Deterministic, so a resumed run sees the same rows."""
    order = sorted(range(len(pairs)), key=lambda k: (-len(pairs[k][0]), k))
    rows: list[list[int]] = []
    room: list[int] = []
    for k in order:
        n = len(pairs[k][0])
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([])
            room.append(width)
            slot = len(rows) - 1
        rows[slot].append(k)
        room[slot] -= n
    return rows


def split_records(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, validation): a seeded shuffle, then the last val_fraction (at least one record)."""
    if len(records) < 2:
        raise TegakiError("at least two records are needed: one to train on and one to validate")
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = min(max(1, round(len(records) * val_fraction)), len(records) - 1)
    train = [records[i] for i in sorted(order[:-n_val])]
    val = [records[i] for i in sorted(order[-n_val:])]
    return train, val
