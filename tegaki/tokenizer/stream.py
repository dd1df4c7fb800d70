"""Streaming decode: turn token ids into text one at a time without printing mojibake.

A byte-level tokenizer may split one character across tokens: "の" is the three bytes e3 81 ae,
and GPT-2 spends two or three tokens on it. Decoding each token alone would print U+FFFD (�)
for the halves. So we keep a small byte buffer and only release text up to the last complete
character; the incomplete tail (at most 3 bytes) waits for the next token.

The rule that keeps the pieces exactly equal to a one-shot `bytes.decode("utf-8", "replace")`:
hold back a tail only when it is a *valid beginning* of a UTF-8 sequence that is still too short.
Anything else (a stray continuation byte, an impossible lead byte) can never become valid, so
it is released at once and decodes to U+FFFD just as it would in the full text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def _sequence_length(lead: int) -> int:
    """How many bytes a UTF-8 sequence starting with `lead` has; 0 if `lead` cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0  # 80..BF are continuation bytes; C0, C1, F5..FF never appear in UTF-8


def _second_byte_range(lead: int) -> tuple[int, int]:
    """The allowed range of the byte after `lead`. Narrower than 80..BF for a few lead bytes,
    which is how UTF-8 forbids overlong forms (E0, F0), surrogates (ED) and code points past
    U+10FFFF (F4)."""
    return {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(lead, (0x80, 0xBF))


def incomplete_tail_length(buffer: bytes) -> int:
    """The number of bytes at the end of `buffer` that start a valid but unfinished character.

    0 when the buffer ends on a character boundary (or on bytes that can never be completed).
    """
    # A sequence is at most 4 bytes, so its lead byte is among the last 3.
    for back in range(1, min(3, len(buffer)) + 1):
        lead = buffer[-back]
        if 0x80 <= lead <= 0xBF:
            continue  # a continuation byte: the lead is further back
        need = _sequence_length(lead)
        if need <= back:
            return 0  # complete (or not a lead byte at all)
        tail = buffer[-back:]
        low, high = _second_byte_range(lead)
        if back >= 2 and not low <= tail[1] <= high:
            return 0
        if any(not 0x80 <= b <= 0xBF for b in tail[2:]):
            return 0
        return back
    return 0


class StreamDecoder:
    """Token-by-token decoder for generation loops.

    >>> d = StreamDecoder(tok)
    >>> for id in generated: print(d.push(id), end="")
    >>> print(d.flush())

    Every string returned is free of U+FFFD unless the bytes really are invalid UTF-8, and all
    returned pieces joined equal `tok.decode(ids)`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = b""  # the start of a character whose other bytes are still to come

    def push(self, token_id: int) -> str:
        buffer = self.pending + self.tokenizer.token_bytes(token_id)
        keep = incomplete_tail_length(buffer)
        ready, self.pending = buffer[: len(buffer) - keep], buffer[len(buffer) - keep :]
        return ready.decode("utf-8", errors="replace")

    def flush(self) -> str:
        """Release whatever is left; an unfinished character at the very end becomes U+FFFD."""
        rest, self.pending = self.pending, b""
        return rest.decode("utf-8", errors="replace")


def stream_decode(tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Yield text pieces as ids arrive (works on a live generator); empty pieces are skipped."""
    decoder = StreamDecoder(tokenizer)
    for token_id in ids:
        piece = decoder.push(token_id)
        if piece:
            yield piece
    piece = decoder.flush()
    if piece:
        yield piece
