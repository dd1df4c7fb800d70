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
from tegaki.tokenizer.base import Tokenizer
from tegaki.tokenizer.bpe import BytePairTokenizer, token_to_str


def tokenizer_json(tok: BytePairTokenizer) -> dict:
    specials = set(tok.special_tokens.values())
    vocab = {token_to_str(token): i for i, token in sorted(tok.vocab.items()) if i not in specials}
    vocab.update(tok.special_tokens)
    merges = [[token_to_str(tok.vocab[left]), token_to_str(tok.vocab[right])]
              for (left, right), _ in sorted(tok.merges.items(), key=lambda item: item[1])]
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in sorted(tok.special_tokens.items(), key=lambda x: x[1])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            byte_level,
        ]},
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": vocab, "merges": merges,
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
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(tok), ensure_ascii=False), encoding="utf-8")
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
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out
