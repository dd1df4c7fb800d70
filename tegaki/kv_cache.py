"""The KV cache: every layer's keys and values, kept so that decoding feeds the model one token a step.

Decoding one token at a time with the plain model would recompute every earlier token's keys and
values at every step: O(T^2) work for T tokens. The keys and values of a token never change once
it is computed (attention is causal), so we keep them here:

    prefill   the whole prompt in one forward pass; every layer writes its keys/values
    decode    one token per step; each layer appends one key/value and attends over the cache

The proof that the cache is right is nanochat's: greedy decoding with and without it gives the
same tokens, for every architecture (tests/test_generate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tegaki.errors import TegakiError
from tegaki.mask import CAUSAL, SEES_ALL, build_attention_mask


class KVCache:
    """Preallocated keys and values for every layer, filled by prefill and then one token a step.

    Full-attention layers keep `max_len` slots: token number c (counting columns of the batch,
    padding included) lives in slot c. Sliding-window layers keep only `window` slots, used as a
    ring: token c lives in slot c % window, overwriting token c - window, which no later query
    can see anyway (a query at i sees keys at j > i - window).

    Beside the tensors, each layer kind keeps per slot the absolute position of the key there and
    whether it is a real token (False for left padding or a slot not yet written). Every layer of
    a kind shares these, so the mask for a step is built once per kind, not once per layer.

    The protocol model.py uses: `length` (columns cached before this forward),
    `update(layer_idx, k, v, positions) -> (k_all, v_all, mask)`, `advance(T)`; and
    `mark_padding(padding_mask)` before the layers when some tokens are padding.
    Where nothing is hidden but the future, the mask is named rather than built (mask.py): CAUSAL for
    a fresh causal block, SEES_ALL for one query that may see every key handed back.
    """

    def __init__(self, config, batch_size: int, max_len: int, *, dtype=torch.float32, device="cpu", static=False):
        self.batch_size, self.max_len = batch_size, max_len
        # static: one-token steps attend over every slot with a mask built from tensors, and the
        # count of cached tokens is a tensor -- so a torch.compile'd step has one shape and
        # compiles once, instead of once per length.
        self.static = static
        self._length = 0
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)  # static mode's count
        self.windows = [config.window(i) for i in range(config.n_layer)]
        K, D, B = config.n_kv_head, config.head_dim, batch_size
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for window in self.windows:
            slots = max_len if window is None else min(window, max_len)
            self.k.append(torch.zeros(B, K, slots, D, dtype=dtype, device=device))  # (B, K, slots, D)
            self.v.append(torch.zeros(B, K, slots, D, dtype=dtype, device=device))
        # Per layer kind (the window, None = full): what each slot holds.
        self.slot_pos: dict[int | None, torch.Tensor] = {}
        self.slot_valid: dict[int | None, torch.Tensor] = {}
        for window in set(self.windows):
            slots = max_len if window is None else min(window, max_len)
            self.slot_pos[window] = torch.zeros(B, slots, dtype=torch.long, device=device)
            self.slot_valid[window] = torch.zeros(B, slots, dtype=torch.bool, device=device)
        self.has_padding = False
        self._new_valid: torch.Tensor | None = None  # (B, T) of the forward under way
        self._steps: dict[int | None, _Step] = {}  # this forward's plan per layer kind

    @property
    def length(self) -> int:
        return int(self.cursor) if self.static else self._length

    def mark_padding(self, padding_mask: torch.Tensor) -> None:
        """padding_mask (B, T) for the tokens about to go in: False marks padding."""
        self._new_valid = padding_mask.bool()
        if not bool(self._new_valid.all()):
            self.has_padding = True

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store this forward's k, v (B, K, T, D) of one layer; return every key and value the new
        queries may attend to, (B, K, S, D) each, and the mask (B, 1, T, S), CAUSAL or SEES_ALL."""
        window = self.windows[layer_idx]
        step = self._steps.get(window)
        if step is None:  # the first layer of this kind in this forward: plan once for all of them
            step = self._steps[window] = self._plan(window, positions)
        k_buf, v_buf = self.k[layer_idx], self.v[layer_idx]
        if step.static:  # a slot index tensor, every slot handed back
            k_buf.index_copy_(2, step.slots, k)
            v_buf.index_copy_(2, step.slots, v)
            return k_buf, v_buf, step.mask  # every slot; the mask hides the empty and the stale
        if step.keep_old is not None:
            # Several tokens into a sliding ring: read what is cached *before* overwriting it,
            # since the first new queries still need keys that the last new tokens replace.
            k_all = torch.cat([k_buf[:, :, : step.keep_old], k], dim=2)  # (B, K, old + T, D)
            v_all = torch.cat([v_buf[:, :, : step.keep_old], v], dim=2)
            k_buf[:, :, step.slots] = k[:, :, step.take]
            v_buf[:, :, step.slots] = v[:, :, step.take]
            return k_all, v_all, step.mask
        k_buf[:, :, step.slots] = k  # in place: no allocation per step
        v_buf[:, :, step.slots] = v
        return k_buf[:, :, : step.visible], v_buf[:, :, : step.visible], step.mask  # views

    def advance(self, T: int) -> None:
        if self.static:
            self.cursor += T  # in place, a tensor: a compiled step must not bake the count in
        else:
            self._length += T
        self._steps.clear()
        self._new_valid = None

    def abandon_step(self) -> None:
        """Forget the plan of a forward that did not finish (its tensors may never have been
        computed, as when recording a CUDA graph fails); the cached keys and values stay."""
        self._steps.clear()
        self._new_valid = None

    # --- planning a forward pass, once per layer kind --------------------------------------------
    def _plan(self, window: int | None, positions: torch.Tensor) -> _Step:
        B, T = positions.shape
        if self.static and T == 1:
            return self._plan_static_step(window, positions)
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise TegakiError(f"the KV cache holds {self.max_len} tokens; {end} were asked for")
        new_valid = self._new_valid if self._new_valid is not None else positions.new_ones(B, T, dtype=torch.bool)
        pos, valid = self.slot_pos[window], self.slot_valid[window]
        n_slots = pos.shape[1]

        if window is None or end <= n_slots or T == 1:
            # Full layers, a ring that has not wrapped yet, or one token into a wrapped ring:
            # write the new keys in place, then attend over slots [0, visible).
            if window is None or end <= n_slots:
                slots, visible = slice(start, end), end
            else:
                slots, visible = slice(start % n_slots, start % n_slots + 1), n_slots
            pos[:, slots] = positions
            valid[:, slots] = new_valid
            # One query with no padding sees every slot handed back (a full ring holds exactly
            # the window); a fresh causal prompt is the kernel's is_causal.
            nothing_to_hide = not self.has_padding and (T == 1 or (start == 0 and window is None))
            mask = SEES_ALL if T == 1 else CAUSAL
            if not nothing_to_hide:
                mask = build_attention_mask(
                    positions, pos[:, :visible], window=window, k_valid=valid[:, :visible]
                )  # (B, 1, T, visible)
            return _Step(slots=slots, visible=visible, mask=mask)

        # Several tokens into a ring that wraps: attend over (old ring contents + the new block),
        # then keep the newest n_slots of them.
        keep_old = min(start, n_slots)
        k_pos = torch.cat([pos[:, :keep_old], positions], dim=1)  # (B, old + T)
        k_valid = torch.cat([valid[:, :keep_old], new_valid], dim=1)
        mask = build_attention_mask(positions, k_pos, window=window, k_valid=k_valid)
        m = min(T, n_slots)
        slots = torch.arange(end - m, end, device=positions.device) % n_slots
        take = torch.arange(T - m, T, device=positions.device)
        pos[:, slots] = positions[:, take]
        valid[:, slots] = new_valid[:, take]
        return _Step(slots=slots, visible=None, mask=mask, keep_old=keep_old, take=take)

    def _plan_static_step(self, window: int | None, positions: torch.Tensor) -> _Step:
        """One token, no Python number that changes from step to step (see `static`)."""
        pos, valid = self.slot_pos[window], self.slot_valid[window]
        slot = self.cursor % pos.shape[1]  # (1,): full layers never wrap, rings do
        pos.index_copy_(1, slot, positions)
        new_valid = self._new_valid if self._new_valid is not None else torch.ones_like(positions, dtype=torch.bool)
        valid.index_copy_(1, slot, new_valid)
        mask = build_attention_mask(positions, pos, window=window, k_valid=valid)  # (B, 1, 1, slots)
        return _Step(slots=slot, visible=None, mask=mask, static=True)


@dataclass
class _Step:
    slots: object  # a slice or an index tensor into the slot axis
    visible: int | None
    mask: torch.Tensor | str  # a tensor, or CAUSAL / SEES_ALL
    keep_old: int | None = None  # a block into a wrapping ring: old slots to attend over too
    take: torch.Tensor | None = None  # ... and which of the new tokens the ring keeps
    static: bool = False
