"""A compiled encoder for a byte-level BPE: tiktoken running the very same vocabulary.

`bpe.py` encodes in readable Python; tiktoken's Rust core does the same work faster and
releases the GIL, so threads can share it. It is an optional extra (`pip install -e
'.[fast]'` in a clone); without it the readable encoder runs, and it stays the twin the tests compare with.

tiktoken and the readable loop rank merges differently. Ours fuses the adjacent *pair* (a, b) with
the earliest merge; tiktoken fuses the adjacent pair whose *joined bytes* form the earliest token.
They disagree only when two neighbours x, y spell a token t that was not made by merging x and y.
Such a pair can appear while encoding only if BPE, run on the bytes of t alone, stops at [x, y]
instead of reaching t (merges inside a span happen in the same order whatever surrounds it). So
"every token encodes to itself" is exactly the condition for tiktoken to give our ids, and
`tiktoken_agrees` checks it for each vocabulary instead of assuming it.
"""

from __future__ import annotations


def tiktoken_agrees(tok) -> bool:
    """True when tiktoken, fed `tok`'s vocabulary with rank = id, gives the same ids as `tok`:
    every multi-byte token's bytes encode back to that one token (see the module docstring)."""
    specials = set(tok.special_tokens.values())
    for token_id, token in tok.vocab.items():
        if len(token) > 1 and token_id not in specials and tok.encode_chunk_fast(token) != [token_id]:
            return False
    return True


def tiktoken_encoding(tok):
    """tiktoken's Encoding for the byte-level BPE `tok`, or None when tiktoken is not installed or
    would not give the same ids (two ids for the same bytes, or a token that is not its own encoding)."""
    try:
        import tiktoken
    except ImportError:
        return None
    specials = set(tok.special_tokens.values())
    ranks = {token: i for i, token in tok.vocab.items() if i not in specials}
    if len(ranks) != len(tok.vocab) - len(specials) or not tiktoken_agrees(tok):
        return None
    try:
        return tiktoken.Encoding(
            f"tegaki-{tok.name}", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=dict(tok.special_tokens)
        )
    except ValueError:  # a pattern tiktoken's regex engine cannot compile
        return None
