"""Export a byte-level BPE as a transformers `tokenizer.json`, so others can load ours.

The file is plain JSON in the `tokenizers` library's format; writing it needs neither
`tokenizers` nor `transformers` (tegaki's core never imports them; the tests load the result with
`transformers.AutoTokenizer` and compare ids). The pieces map one to one onto ours:

    our pre-tokenization regex   → pre_tokenizer: Split(regex, "Isolated") then ByteLevel(use_regex=False)
    bytes as printable characters → the ByteLevel step uses the same table as `bytes_to_unicode`
    vocab + merges               → model: BPE with vocab {"Ġthe": 262, …} and merges [["Ġ", "t"], …]
    special tokens               → added_tokens (matched in text before the regex, like ours)
"""

from __future__ import annotations

import json
from pathlib import Path

from tegaki.errors import TegakiError
from tegaki.files import atomic_write_text
from tegaki.tokenizer.base import Tokenizer
from tegaki.tokenizer.bpe import BytePairTokenizer, token_to_str


def tokenizer_json(tok: BytePairTokenizer) -> dict:
    specials = set(tok.special_tokens.values())
    vocab = {token_to_str(token): i for i, token in sorted(tok.vocab.items()) if i not in specials}
    vocab.update(tok.special_tokens)
    merges = [
        [token_to_str(tok.vocab[left]), token_to_str(tok.vocab[right])]
        for (left, right), _ in sorted(tok.merges.items(), key=lambda item: item[1])
    ]
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for s, i in sorted(tok.special_tokens.items(), key=lambda x: x[1])
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def export_hf_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write `tokenizer.json` + `tokenizer_config.json` for `transformers.AutoTokenizer`."""
    if not isinstance(tok, BytePairTokenizer):
        raise TegakiError(
            f"{tok.name} is a {tok.kind} tokenizer; export to tokenizer.json is written for byte-level "
            "BPE only (SentencePiece models with byte fallback and tegaki's exact-round-trip rules have "
            "no faithful tokenizer.json form). Share the saved folder's spm.model instead."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", json.dumps(tokenizer_json(tok), ensure_ascii=False))
    eot = next((s for s, i in tok.special_tokens.items() if i == tok.eot_id), None)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # otherwise decode would rewrite " ." as "."
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": None,
    }
    if tok.name == "gpt2":
        config["model_max_length"] = 1024  # GPT-2's context; a trained vocabulary has none of its own
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


# --- and back: reading a byte-level BPE tokenizer.json -------------------------------------------


def load_hf_tokenizer_json(path: str | Path, name: str | None = None) -> BytePairTokenizer:
    """Read a transformers `tokenizer.json` that holds a byte-level BPE (GPT-2's, ours, and others
    built the same way). Anything else gets a TegakiError that names the part tegaki cannot follow."""
    from tegaki.tokenizer.bpe import PATTERNS

    path = Path(path)
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}

    def unsupported(what):
        return TegakiError(f"{path}: {what}; tegaki reads byte-level BPE tokenizer.json files only")

    if model.get("type") != "BPE":
        raise unsupported(f"the model is {model.get('type')!r}, not BPE")
    if model.get("ignore_merges") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise unsupported("it uses ignore_merges or subword prefixes/suffixes")
    if spec.get("normalizer") is not None:
        raise unsupported(f"it normalizes text first ({spec['normalizer'].get('type')})")
    pattern = _pattern_of(spec.get("pre_tokenizer"), PATTERNS["gpt2"])
    if pattern is None:
        raise unsupported("its pre-tokenizer is not ByteLevel (optionally after one regex Split)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    name = name or path.parent.name
    pattern_name = next((k for k, v in PATTERNS.items() if v == pattern), pattern)
    return BytePairTokenizer.from_strings(model["vocab"], merges, pattern_name, specials, name)


def _pattern_of(pre_tokenizer: dict | None, gpt2_pattern: str) -> str | None:
    """The regex a pre-tokenizer splits with, if it is one tegaki can run: ByteLevel(use_regex)
    alone, or Split(regex, Isolated) followed by ByteLevel(use_regex=False)."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer["pretokenizers"] if pre_tokenizer["type"] == "Sequence" else [pre_tokenizer]
    *splits, last = steps
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space"):
        return None
    if not splits:
        return gpt2_pattern if last.get("use_regex", True) else None
    if len(splits) != 1 or last.get("use_regex", True):
        return None
    split = splits[0]
    if (
        split.get("type") != "Split"
        or "Regex" not in split.get("pattern", {})
        or split.get("behavior") != "Isolated"
        or split.get("invert")
    ):
        return None
    return split["pattern"]["Regex"]
