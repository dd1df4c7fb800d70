"""The kinds of tokenizer tegaki trains, behind one function: byte-level BPE or SentencePiece."""

from __future__ import annotations

from collections.abc import Iterable

from tegaki.errors import TegakiError
from tegaki.tokenizer.base import Tokenizer
from tegaki.tokenizer.bpe import ENDOFTEXT
from tegaki.tokenizer.choose import AUTO, resolve_pattern
from tegaki.tokenizer.spm import train_sentencepiece
from tegaki.tokenizer.trainer import check_vocab_size, train_bpe, train_bpe_tokenizers

# bpe: byte-level BPE (GPT-2 style); unigram / sp-bpe: SentencePiece with byte fallback.
KINDS = ("bpe", "unigram", "sp-bpe")
# Who trains a byte-level BPE: tegaki's own trainer.py, or the tokenizers library (faster).
BACKENDS = ("readable", "tokenizers")


def train_tokenizer(
    texts: list[str],
    vocab_size: int,
    kind: str = "bpe",
    pattern: str = AUTO,
    backend: str = "readable",
    special_tokens: Iterable[str] = (ENDOFTEXT,),
    name: str = "bpe",
    verbose: bool = False,
) -> Tokenizer:
    """A tokenizer of `kind` trained on `texts`; `pattern` and `backend` are for bpe only.
    pattern "auto": chosen from the corpus's scripts (tegaki.tokenizer.choose)."""
    if kind not in KINDS:
        raise TegakiError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
    check_vocab_size(vocab_size)
    if kind == "bpe":
        pattern = resolve_pattern(pattern, texts)
        if backend == "tokenizers":
            return train_bpe_tokenizers(texts, vocab_size, pattern, special_tokens, name)
        return train_bpe(texts, vocab_size, pattern, special_tokens, name, verbose=verbose)
    if backend != "readable":
        raise TegakiError(f"--backend {backend} is for --kind bpe; SentencePiece kinds train with sentencepiece")
    model_type = "unigram" if kind == "unigram" else "bpe"
    return train_sentencepiece(texts, vocab_size, model_type, special_tokens, name)
