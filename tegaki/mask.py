"""Which keys each query may look at: the one place attention masks are built.

The model (a whole sequence), the written-out and fused attention paths, and the KV cache (a step
over cached keys) all call `build_attention_mask`; none builds a mask of its own.
"""

from __future__ import annotations

import torch

# Two masks need no tensor, and are named instead, so that attention can hand them to a fused
# kernel's own fast path (its is_causal, or no mask at all) rather than a (T, S) tensor of booleans:
CAUSAL = "causal"  # a block of tokens attending to itself: each query sees itself and the keys before it
SEES_ALL = "sees_all"  # one query that may see every key it is given (a cached decode step, nothing hidden)


def build_attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    k_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which keys each query may look at: True = visible. Shape (B, 1, Tq, Tk).

    q_pos (B, Tq) and k_pos (B, Tk) are absolute positions in the sequence. Causal: a query at
    position i sees keys at j <= i, never the future -- otherwise training would let the model read
    the very token it must predict. Sliding window w: only i - w < j. k_valid (B, Tk) marks real
    keys (False for left padding or empty cache slots).
    """
    q = q_pos[:, :, None]  # (B, Tq, 1)
    k = k_pos[:, None, :]  # (B, 1, Tk)
    visible = torch.ones(q.shape[0], q.shape[1], k.shape[2], dtype=torch.bool, device=q.device)  # (B, Tq, Tk)
    if causal:
        visible = visible & (k <= q)
    if window is not None:
        visible = visible & (q - k < window)
    if k_valid is not None:
        visible = visible & k_valid[:, None, :]
    return visible[:, None]  # (B, 1, Tq, Tk): broadcast over heads


def sequence_mask(
    positions: torch.Tensor, *, causal: bool = True, window: int | None = None, padding_mask: torch.Tensor | None = None
) -> torch.Tensor | str:
    """The mask of a sequence attending to itself (no cache), or CAUSAL for the plain causal case
    (nothing hidden but the future: the fused kernel then runs its is_causal fast path)."""
    if causal and window is None and padding_mask is None:
        return CAUSAL
    return build_attention_mask(positions, positions, causal=causal, window=window, k_valid=padding_mask)
