"""Byte-level BPE, the GPT-2 way, in one readable file.

Encoding happens in three steps:

1. Pre-tokenize: a regex cuts the text into chunks ("Hello", ",", " I", " am"). Merges never cross
   a chunk boundary, so " dog" is one token whatever word came before it.
2. Bytes: each chunk becomes its UTF-8 bytes; every byte (0..255) is a token of its own, so any
   text at all can be encoded: there is no "unknown" token.
3. Merge: repeatedly fuse the adjacent pair of tokens that was merged *earliest* during training,
   until no adjacent pair has a merge. Merge k makes token id `first_merge_id + k`, so "earliest"
   simply means "smallest resulting id".

The only GPT-2 oddity is the file format: `encoder.json` and `vocab.bpe` store tokens as printable
strings, one character per byte (see `bytes_to_unicode`), so the files stay readable text.

`encode` runs through tiktoken (`compiled.py`) when it is installed and gives the same ids, which
it checks per vocabulary; `encode_readable` is the loop below, always available, and the twin the
tests hold the compiled path to.
"""

from __future__ import annotations

import heapq
import json
from functools import cache
from pathlib import Path

import regex

from tegaki.errors import TegakiError
from tegaki.files import atomic_write_text
from tegaki.tokenizer.base import Tokenizer, write_meta
from tegaki.tokenizer.compiled import tiktoken_encoding

# Pre-tokenization patterns, by name. GPT-2's keeps letters, digits and other symbols apart and
# glues one leading space to a word. GPT-4's (cl100k) also splits numbers into groups of at most
# three digits, matches contractions case-insensitively and keeps newlines apart from words. It is
# written as tiktoken writes it: possessive quantifiers (`++`, `?+`) never backtrack, which
# keeps the regex fast, and `\s++$` keeps trailing whitespace at the very end of a text together.
PATTERNS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
}

ENDOFTEXT = "<|endoftext|>"


def pattern_for(name_or_regex: str) -> str:
    """A pattern name ("gpt2", "gpt4") or a regex of your own."""
    return PATTERNS.get(name_or_regex, name_or_regex)


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to a printable character, used only in the saved files.

    Printable bytes map to themselves ("A" → "A"); the rest (controls, space, 0x7F..0xA0, 0xAD)
    are shifted to code points from 256 up, in order. That is why a space shows up as "Ġ" (U+0120)
    and a newline as "Ċ" (U+010A) in GPT-2's vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@cache
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(text: str) -> bytes:
    table = unicode_to_bytes()
    return bytes(table[c] for c in text)


class BytePairTokenizer(Tokenizer):
    """Byte-level BPE: GPT-2 itself, or one trained by `tegaki.tokenizer.trainer`.

    vocab:  id → the bytes it stands for (all 256 single bytes must be present)
    merges: (left id, right id) → merged id, where a smaller merged id means an earlier merge
    """

    kind = "bpe"
    CACHE_SIZE = 100_000  # chunks remembered; a chunk seen before costs one dict lookup
    SHORT_CHUNK = 12  # bytes; longer chunks (a Japanese sentence is one \p{L}+ run) use the heap
    use_compiled = True  # set False to encode with the readable loop only

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: dict[tuple[int, int], int],
        pattern: str = "gpt2",
        special_tokens: dict[str, int] | None = None,
        name: str = "bpe",
    ):
        self.name = name
        self.vocab = dict(vocab)
        self.merges = dict(merges)
        self.pattern_name = pattern
        self.pattern = pattern_for(pattern)
        self.compiled_pattern = regex.compile(self.pattern)
        self.special_tokens = dict(special_tokens or {})
        for text, token_id in self.special_tokens.items():
            self.vocab[token_id] = text.encode("utf-8")
        self.vocab_size = max(self.vocab) + 1
        self.byte_ids = self._single_byte_ids()
        self.cache: dict[str, list[int]] = {}
        self.compiled = None  # tiktoken's Encoding of this vocabulary, built on first use
        self.compiled_checked = False

    def __getstate__(self):
        # Processes that receive a tokenizer build their own compiled encoder; it does not pickle.
        return {**self.__dict__, "compiled": None, "compiled_checked": False}

    def _single_byte_ids(self) -> list[int]:
        """byte_ids[b] is the id of the one-byte token b (GPT-2 does not number them 0..255)."""
        ids = {token: i for i, token in self.vocab.items() if len(token) == 1}
        missing = [b for b in range(256) if bytes([b]) not in ids]
        if missing:
            raise TegakiError(f"{self.name}: the vocabulary lacks single-byte tokens {missing[:8]}")
        return [ids[bytes([b])] for b in range(256)]

    # --- encoding -----------------------------------------------------------------------------

    def compiled_encoder(self):
        """tiktoken's Encoding of this vocabulary, or None (not installed, not exact, or switched off)."""
        if not self.use_compiled:
            return None
        if not self.compiled_checked:
            self.compiled, self.compiled_checked = tiktoken_encoding(self), True
        return self.compiled

    def _encode_ordinary(self, text: str) -> list[int]:
        compiled = self.compiled_encoder()
        if compiled is not None:
            return compiled.encode_ordinary(text)
        return self.encode_readable(text)

    def encode_readable(self, text: str) -> list[int]:
        """Encode valid Unicode text (no special tokens) with the readable loop: pre-tokenize, then BPE."""
        ids: list[int] = []
        for chunk in self.compiled_pattern.findall(text):
            cached = self.cache.get(chunk)
            if cached is None:
                chunk_bytes = chunk.encode("utf-8")
                if len(chunk_bytes) <= self.SHORT_CHUNK:
                    cached = self.encode_chunk(chunk_bytes)
                else:
                    cached = self.encode_chunk_fast(chunk_bytes)
                if len(self.cache) >= self.CACHE_SIZE:
                    self.cache.clear()  # crude but bounded; the common chunks come straight back
                self.cache[chunk] = cached
            ids.extend(cached)
        return ids

    def encode_chunk(self, chunk: bytes) -> list[int]:
        """The BPE loop on one pre-token: merge the earliest-learned adjacent pair until none is left."""
        ids = [self.byte_ids[b] for b in chunk]
        while len(ids) >= 2:
            pairs = set(zip(ids, ids[1:]))
            pair = min(pairs, key=lambda p: self.merges.get(p, float("inf")))
            if pair not in self.merges:
                break  # no adjacent pair was ever merged: done
            ids = merge(ids, pair, self.merges[pair])
        return ids

    def encode_chunk_fast(self, chunk: bytes) -> list[int]:
        """The same result as `encode_chunk` in O(n log n) instead of O(n²).

        The tokens form a linked list; a heap holds (merged id, position) for every mergeable
        adjacent pair. Popping the smallest gives the earliest merge, leftmost first, just as the
        readable loop does. A merge can only create pairs whose merge came later (a token must
        exist before it can be merged again), so the order stays the same. Heap entries go stale
        when a neighbour changes; they are skipped when popped.
        """
        ids = [self.byte_ids[b] for b in chunk]
        n = len(ids)
        next_pos = list(range(1, n + 1))  # n means "end"
        prev_pos = list(range(-1, n - 1))  # -1 means "start"
        alive = [True] * n
        merges = self.merges
        heap = [(merges[p], i) for i, p in enumerate(zip(ids, ids[1:])) if p in merges]
        heapq.heapify(heap)
        while heap:
            new_id, i = heapq.heappop(heap)
            j = next_pos[i]
            if not alive[i] or j == n or merges.get((ids[i], ids[j])) != new_id:
                continue  # stale: one of the two tokens has changed since this entry was pushed
            ids[i] = new_id  # token i absorbs token j
            alive[j] = False
            next_pos[i] = next_pos[j]
            if next_pos[j] < n:
                prev_pos[next_pos[j]] = i
            left, right = prev_pos[i], next_pos[i]
            if left >= 0 and (ids[left], new_id) in merges:
                heapq.heappush(heap, (merges[ids[left], new_id], left))
            if right < n and (new_id, ids[right]) in merges:
                heapq.heappush(heap, (merges[new_id, ids[right]], i))
        return [token for token, keep in zip(ids, alive) if keep]

    # --- decoding -----------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self.vocab[int(token_id)]
        except KeyError:
            self._check_id(token_id)
            raise TegakiError(f"{self.name} has no token with id {token_id}") from None

    def add_special_tokens(self, texts, first_id: int | None = None) -> dict[str, int]:
        texts = list(texts)
        next_id = max(self.vocab_size, first_id or 0)
        for text in texts:
            if text not in self.special_tokens:
                self.special_tokens[text] = next_id
                self.vocab[next_id] = text.encode("utf-8")
                next_id += 1
        self.vocab_size = max(self.vocab) + 1
        self.compiled, self.compiled_checked = None, False  # tiktoken's copy must learn them too
        return {text: self.special_tokens[text] for text in texts}

    # --- files --------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write GPT-2's two files (readable by GPT-2 tooling) and tegaki's small meta file."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        encoder = {
            token_to_str(token): i for i, token in sorted(self.vocab.items()) if i not in self.special_tokens.values()
        }
        encoder.update(self.special_tokens)
        atomic_write_text(folder / "encoder.json", json.dumps(encoder, ensure_ascii=False))
        lines = ["#version: 0.2"]
        for (left, right), _ in sorted(self.merges.items(), key=lambda item: item[1]):
            lines.append(f"{token_to_str(self.vocab[left])} {token_to_str(self.vocab[right])}")
        atomic_write_text(folder / "vocab.bpe", "\n".join(lines) + "\n")
        write_meta(
            folder,
            {
                "kind": self.kind,
                "name": self.name,
                "pattern": self.pattern_name,
                "special_tokens": self.special_tokens,
                "vocab_size": self.vocab_size,
            },
        )
        return folder

    @classmethod
    def from_files(
        cls, folder: str | Path, pattern: str = "gpt2", special_tokens=None, name: str | None = None
    ) -> BytePairTokenizer:
        """Read GPT-2's format from a folder: `encoder.json` + `vocab.bpe`, or the same two files
        under transformers' names, `vocab.json` + `merges.txt`."""
        folder = Path(folder)
        for vocab_file, merges_file in GPT2_FILE_NAMES:
            if (folder / vocab_file).exists() and (folder / merges_file).exists():
                break
        else:
            raise TegakiError(f"{folder}: expected encoder.json + vocab.bpe (or vocab.json + merges.txt)")
        encoder = json.loads((folder / vocab_file).read_text(encoding="utf-8"))
        merge_lines = (folder / merges_file).read_text(encoding="utf-8").split("\n")
        merge_pairs = [tuple(line.split(" ")) for line in merge_lines if line and not line.startswith("#version")]
        if special_tokens is None:  # GPT-2 keeps "<|endoftext|>" inside encoder.json
            special_tokens = {ENDOFTEXT: encoder[ENDOFTEXT]} if ENDOFTEXT in encoder else {}
        return cls.from_strings(encoder, merge_pairs, pattern, special_tokens, name or folder.name)

    @classmethod
    def from_strings(
        cls,
        encoder: dict[str, int],
        merge_pairs: list[tuple[str, str]],
        pattern: str,
        special_tokens: dict[str, int],
        name: str,
    ) -> BytePairTokenizer:
        """Build from the printable-string form: {"Ġthe": 262, …} and [("Ġ", "t"), …] in merge order."""
        vocab = {i: str_to_token(s) for s, i in encoder.items() if s not in special_tokens}
        ids = {token: i for i, token in vocab.items()}
        merges = {}
        for left, right in merge_pairs:
            left, right = str_to_token(left), str_to_token(right)
            merges[ids[left], ids[right]] = ids[left + right]
        # The merge loop ranks merges by the id they make; that is only right if ids grow in merge order.
        made = list(merges.values())
        if any(a >= b for a, b in zip(made, made[1:])):
            raise TegakiError(
                f"{name}: merged token ids do not grow in merge order, which tegaki's BPE "
                "relies on (merge k must make a newer id than merge k-1)"
            )
        return cls(vocab, merges, pattern, special_tokens, name)


GPT2_FILE_NAMES = [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")]


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
