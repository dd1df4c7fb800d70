"""What every tegaki tokenizer offers, whatever its kind.

A kind (byte-level BPE, SentencePiece) only has to say how ordinary text becomes ids
(`_encode_ordinary`) and which bytes each id stands for (`token_bytes`). Special tokens, decoding,
streaming and the folder format are shared and live here.

Special-token policy (like tiktoken's `allowed_special`): by default, `encode` turns the literal
text of a special token, e.g. "<|endoftext|>", into its single id. That is convenient for
training data that marks document ends in the text itself. When the text comes from a user and
must never smuggle in a control token, pass `allowed_special="none"` (or use `encode_ordinary`):
then "<|endoftext|>" is encoded as the ordinary characters it is made of. Either way
`decode(encode(s)) == s` (for any valid Unicode string; lone surrogates become U+FFFD).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import regex

from tegaki.errors import TegakiError
from tegaki.files import atomic_write_text
from tegaki.tokenizer.stream import StreamDecoder, stream_decode

META_FILE = "tegaki_tokenizer.json"  # says which kind a saved folder holds; read by `load`


class Tokenizer:
    """The shared interface. Subclasses set `name`, `special_tokens` and `vocab_size`."""

    name: str = "tokenizer"
    kind: str = ""
    special_tokens: dict[str, int]
    vocab_size: int

    # --- what a kind provides -----------------------------------------------------------------

    def _encode_ordinary(self, text: str) -> list[int]:
        """Encode valid Unicode text with no special-token handling at all."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token: its UTF-8 text)."""
        raise NotImplementedError

    def save(self, folder: str | Path) -> Path:
        raise NotImplementedError

    def add_special_tokens(self, texts: Iterable[str], first_id: int | None = None) -> dict[str, int]:
        """Give each text not yet special an id of its own, from `first_id` (default: the vocabulary's
        end) up; returns {text: id} for all of them. Ordinary text never encodes to these ids (its
        bytes go through `_encode_ordinary`); `encode` finds them as it finds every special token."""
        raise TegakiError(
            f"{self.name} is a {self.kind} tokenizer; tegaki adds special tokens to byte-level BPE "
            "tokenizers only (train one with --special-tokens, or give the model a chat template)"
        )

    # --- shared -------------------------------------------------------------------------------

    @property
    def eot_id(self) -> int | None:
        """The end-of-text id, or None when this tokenizer has none."""
        for name in ("<|endoftext|>", "</s>", "<eos>"):
            if name in self.special_tokens:
                return self.special_tokens[name]
        return None

    def encode(self, text: str, allowed_special: str | Iterable[str] = "all") -> list[int]:
        """Text → ids. `allowed_special`: "all" (default), "none", or a set of special-token names;
        special tokens not allowed are encoded as plain text."""
        allowed = self._allowed_specials(allowed_special)
        text = valid_unicode(text)
        if not allowed:
            return self._encode_ordinary(text)
        # Longest names first, so "<|a|>" never hides inside a match for a longer "<|a|>x".
        pattern = "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True))
        ids: list[int] = []
        start = 0
        for match in regex.finditer(pattern, text):
            ids.extend(self._encode_ordinary(text[start : match.start()]))
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids.extend(self._encode_ordinary(text[start:]))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text as plain characters: "<|endoftext|>" here is 13 characters, not a token."""
        return self._encode_ordinary(valid_unicode(text))

    def _allowed_specials(self, allowed_special) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if allowed_special == "none" or allowed_special is None:
            return set()
        allowed = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TegakiError(
                f"unknown special token(s) {sorted(unknown)}; {self.name} knows {sorted(self.special_tokens) or 'none'}"
            )
        return allowed

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if hasattr(ids, "tolist"):  # a tensor or array: plain ints, not 0-d tensors
            ids = ids.tolist()
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids → text. Bytes that are not valid UTF-8 (e.g. half a character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decode(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text as ids arrive, never splitting a character; see `tegaki.tokenizer.stream`."""
        return stream_decode(self, ids)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= int(token_id) < self.vocab_size:
            raise TegakiError(
                f"token id {token_id} is outside the vocabulary of {self.name} (ids 0..{self.vocab_size - 1})"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def valid_unicode(text: str) -> str:
    """A Python str may hold lone surrogates ("\\ud800"), which no UTF-8 byte sequence spells.
    Like tiktoken, replace each with U+FFFD (a surrogate pair written as two characters is joined
    into the one character it stands for). Valid text, the usual case, is returned as is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def write_meta(folder: Path, meta: dict) -> None:
    # Written last and atomically: a folder with this file holds a whole tokenizer.
    atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
