"""SentencePiece (unigram or BPE) behind tegaki's interface.

SentencePiece works on characters, not bytes, and falls back to byte tokens (<0xE3>, …) only for
characters outside its vocabulary (`byte_fallback=True`). Its defaults rewrite text, so
`decode(encode(s))` would not give `s` back: NFKC normalisation ("ｶ" → "カ"), a space added at
the start, runs of spaces squeezed. We train with those switched off:

    normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False

One rewrite cannot be switched off for unigram training: spaces are stored as "▁" (U+2581), so a
real "▁" in the text would come back as a space. `_encode_ordinary` therefore sends each literal
"▁" as its three UTF-8 byte tokens, and decoding is done here from each piece's bytes rather than
by `sp.decode`. With that, `decode(encode(s)) == s` for any string (tested with hypothesis).
Special tokens are SentencePiece "control symbols": they own an id but never match inside text;
`Tokenizer.encode` finds them, as for every kind.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

from tegaki.errors import TegakiError
from tegaki.files import atomic_write_bytes
from tegaki.tokenizer.base import Tokenizer, write_meta
from tegaki.tokenizer.bpe import ENDOFTEXT

MODEL_FILE = "spm.model"
SPACE_MARK = "▁"  # U+2581, SentencePiece's stand-in for a space


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise TegakiError("SentencePiece kinds need the sentencepiece package: pip install sentencepiece") from None
    return sentencepiece


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, model_type: str, special_tokens: Iterable[str] = (), name: str = "spm"):
        spm = _sentencepiece()
        self.name = name
        self.model_type = model_type
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.special_tokens = {s: self.sp.piece_to_id(s) for s in special_tokens}
        self.pieces = [self._piece_bytes(i) for i in range(self.vocab_size)]
        self.space_mark_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]

    def _piece_bytes(self, i: int) -> bytes:
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])  # "<0xE3>" → b"\xe3"
        if self.sp.is_control(i):
            return piece.encode() if piece in self.special_tokens else b""
        if self.sp.is_unknown(i):
            return "\ufffd".encode()  # never produced with byte fallback on
        return piece.replace(SPACE_MARK, " ").encode()

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(text.split(SPACE_MARK)):
            if k:  # a literal "▁" between parts, sent as bytes so it does not decode to " "
                ids.extend(self.space_mark_ids)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        return self.pieces[int(token_id)]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / MODEL_FILE, self.model_proto)
        write_meta(
            folder,
            {
                "kind": self.kind,
                "name": self.name,
                "model_type": self.model_type,
                "model_file": MODEL_FILE,
                "special_tokens": self.special_tokens,
                "vocab_size": self.vocab_size,
            },
        )
        return folder

    @classmethod
    def from_folder(cls, folder: Path, meta: dict) -> SentencePieceTokenizer:
        model_path = folder / meta.get("model_file", MODEL_FILE)
        if not model_path.exists():
            raise TegakiError(f"{folder} says it holds a SentencePiece model, but {model_path.name} is missing")
        return cls(
            model_path.read_bytes(),
            meta.get("model_type", "unigram"),
            meta.get("special_tokens", {}),
            meta.get("name") or folder.name,
        )


def train_sentencepiece(
    texts: Iterable[str] | str,
    vocab_size: int,
    model_type: str = "unigram",
    special_tokens: Iterable[str] = (ENDOFTEXT,),
    name: str = "spm",
) -> SentencePieceTokenizer:
    """Train a SentencePiece model (model_type "unigram" or "bpe") with byte fallback, in memory."""
    spm = _sentencepiece()
    if isinstance(texts, str):
        texts = [texts]
    special_tokens = list(special_tokens)
    smallest = 256 + 1 + len(special_tokens)  # bytes, <unk>, specials
    if vocab_size <= smallest:
        raise TegakiError(
            f"vocab size {vocab_size} is too small: SentencePiece with byte fallback needs 256 byte "
            f"tokens + <unk> + {len(special_tokens)} special token(s) = {smallest}, plus room for pieces"
        )
    # SentencePiece trains on "sentences"; lines are ours. Newlines are left to byte fallback.
    lines = [line for text in texts for line in text.split("\n") if line]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=False,
            control_symbols=special_tokens,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            character_coverage=0.9995,
            max_sentence_length=1 << 20,
            hard_vocab_limit=False,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:  # SentencePiece reports bad settings as RuntimeError
        too_small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if too_small:  # its own advice names a flag tegaki does not have: translate it
            raise TegakiError(
                f"--vocab-size {too_small.group(1)} is too small for this text: it has {too_small.group(2)} "
                f"distinct characters that each need a piece; use --vocab-size {too_small.group(2)} or more"
            ) from None
        raise TegakiError(f"SentencePiece training failed: {e}") from None
    return SentencePieceTokenizer(model.getvalue(), model_type, special_tokens, name)
