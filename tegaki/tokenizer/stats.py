"""How well a tokenizer compresses a text, broken down by script.

Each token is attributed to one script: that of the first letter it touches (so " the" is
Latin and "の" is kana); a token of spaces, digits or punctuation only is "other". A token is a
*partial* token when it starts or ends inside a character: the half of a kanji that GPT-2 spends
a token on, which alone decodes to U+FFFD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import regex

SCRIPTS = ("latin", "kana", "kanji", "other")
_SCRIPT_RUNS = regex.compile(r"(\p{Latin}+)|([\p{Hiragana}\p{Katakana}ー]+)|(\p{Han}+)")


def char_scripts(text: str) -> bytearray:
    """One script code per character: 0 latin, 1 kana, 2 kanji, 3 other."""
    codes = bytearray([3]) * len(text)
    for match in _SCRIPT_RUNS.finditer(text):
        code = match.lastindex - 1  # which of the three groups matched
        codes[match.start() : match.end()] = bytes([code]) * (match.end() - match.start())
    return codes


@dataclass
class Row:
    tokens: int = 0
    chars: int = 0
    bytes: int = 0
    partial: int = 0

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def partial_share(self) -> float:
        return self.partial / self.tokens if self.tokens else 0.0

    def add(self, other: Row) -> None:
        self.tokens += other.tokens
        self.chars += other.chars
        self.bytes += other.bytes
        self.partial += other.partial


@dataclass
class Stats:
    total: Row = field(default_factory=Row)
    by_script: dict[str, Row] = field(default_factory=lambda: {s: Row() for s in SCRIPTS})


def documents_stats(tok, documents: list[str]) -> Stats:
    """`token_stats` summed over documents, each encoded on its own (as `prepare` encodes them)."""
    stats = Stats()
    for doc in documents:
        one = token_stats(tok, doc)
        stats.total.add(one.total)
        for script in SCRIPTS:
            stats.by_script[script].add(one.by_script[script])
    return stats


def token_stats(tok, text: str) -> Stats:
    ids = tok.encode(text)
    data = text.encode("utf-8")
    # For each byte: the index of the character it belongs to, and whether a character starts there.
    char_of_byte: list[int] = []
    for index, ch in enumerate(text):
        char_of_byte.extend([index] * len(ch.encode("utf-8")))
    char_of_byte.append(len(text))  # a sentinel "character" just past the end
    scripts = char_scripts(text) + b"\x03"

    stats = Stats()
    start = 0
    for token_id in ids:
        end = start + len(tok.token_bytes(token_id))
        if end == start:
            continue  # an empty token (none of tegaki's kinds emits one for ordinary text)
        first, last = char_of_byte[start], char_of_byte[end - 1]
        starts_inside = start > 0 and char_of_byte[start - 1] == first
        ends_inside = char_of_byte[end] == last
        script = next((SCRIPTS[c] for c in scripts[first : last + 1] if c != 3), "other")
        owned = last + 1 - first - starts_inside  # the characters whose first byte is in this token
        for row in (stats.total, stats.by_script[script]):
            row.tokens += 1
            row.chars += owned
            row.bytes += end - start
            row.partial += starts_inside or ends_inside
        start = end
    assert start == len(data), "the tokens do not spell the text"
    return stats


def format_stats(stats: Stats, title: str) -> str:
    lines = [
        title,
        f"{'script':<8}{'tokens':>11}{'chars':>11}{'chars/token':>13}{'bytes/token':>13}{'partial tokens':>16}",
    ]
    rows = [(s, stats.by_script[s]) for s in SCRIPTS if stats.by_script[s].tokens] + [("all", stats.total)]
    for name, row in rows:
        lines.append(
            f"{name:<8}{row.tokens:>11,}{row.chars:>11,}{row.chars_per_token:>13.3f}"
            f"{row.bytes_per_token:>13.3f}{row.partial_share:>15.1%}"
        )
    return "\n".join(lines)
