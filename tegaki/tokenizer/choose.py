"""The default tokenizer for a corpus: which pre-tokenization pattern a byte-level BPE gets.

Japanese has no spaces between words, so GPT-2's pattern makes each run of letters (often a whole
clause) one chunk and cuts every punctuation mark and newline off into chunks of their own. GPT-4's
pattern keeps a punctuation mark or space with the letters after it ("、次に", "「オプション"), a
sentence end with its newline ("。\\n") and indentation with its line break; merges can then learn
those frequent joins. On Japanese text the tokenizer never saw, the byte-level BPE with GPT-4's
pattern packs the most characters into a token, ahead of SentencePiece's BPE and unigram and of
GPT-2's pattern (`python -m benchmarks.bench_tokenizer`; the numbers are in benchmarks/RESULTS.md). So the
byte-level BPE stays the kind (exact bytes, GPT-2-compatible files, tiktoken speed) and only its
pattern changes. A corpus with few CJK letters keeps the gpt2 pattern.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import regex

AUTO = "auto"  # the pattern name that means "look at the corpus"
CJK_SHARE = 0.2  # this share of CJK letters or more (Japanese, or mixed Japanese and English) -> gpt4
SAMPLE_CHARS = 2_000_000  # the scripts of a corpus show in its first couple of MB
_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}ー]")
_LETTER = regex.compile(r"\p{L}")


@dataclass(frozen=True)
class Choice:
    pattern: str  # a name in tegaki.tokenizer.bpe.PATTERNS
    reason: str  # one sentence for the user


def cjk_share(texts: Iterable[str], sample_chars: int = SAMPLE_CHARS) -> float:
    """The share of letters that are kanji, kana or hangul, over the first `sample_chars` characters."""
    cjk = letters = seen = 0
    for text in texts:
        part = text[: sample_chars - seen]
        cjk += len(_CJK.findall(part))
        letters += len(_LETTER.findall(part))
        seen += len(part)
        if seen >= sample_chars:
            break
    return cjk / letters if letters else 0.0


def choose_pattern(texts: Iterable[str]) -> Choice:
    """gpt4 for a corpus whose letters are at least 20% CJK, else gpt2 (see the module docstring)."""
    share = cjk_share(texts)
    if share >= CJK_SHARE:
        return Choice(
            "gpt4",
            f"{share:.0%} of the letters are kanji/kana/hangul: the gpt4 pattern keeps "
            "punctuation and line ends with the text around them, which compresses "
            "unseen Japanese best (2.72 chars/token at 16k vs 2.56 for SentencePiece BPE)",
        )
    return Choice(
        "gpt2",
        f"{share:.0%} of the letters are kanji/kana/hangul: the gpt2 pattern, as for any "
        "text with spaces between words",
    )


def resolve_pattern(pattern: str, texts: list[str]) -> str:
    """`pattern` itself, or the corpus's choice when it is "auto"."""
    return choose_pattern(texts).pattern if pattern == AUTO else pattern
