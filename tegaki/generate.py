"""Generation: a KV cache, the samplers, the decoding loop, and the `tegaki generate` command.

Decoding one token at a time with the plain model would recompute every earlier token's keys and
values at every step: O(T^2) work for T tokens. The keys and values of a token never change once
it is computed (attention is causal), so we keep them in a cache and feed the model only the
newest token:

    prefill   the whole prompt in one forward pass; every layer writes its keys/values
    decode    one token per step; each layer appends one key/value and attends over the cache

The proof that the cache is right is nanochat's: greedy decoding with and without it gives the
same tokens, for every architecture (tests/test_generate.py).

Sampling turns the last position's logits into the next token, in this order (as transformers
does): repetition / presence penalties -> temperature -> top-k -> top-p -> min-p -> draw.
`temperature=0` means greedy (argmax).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tegaki.errors import TegakiError
from tegaki.fastpath import drop_stale_stacks, prepare_for_decoding
from tegaki.model import build_attention_mask

# -------------------------------------------------------------------------------------------------
# The KV cache
# -------------------------------------------------------------------------------------------------


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
    `update(layer_idx, k, v, positions) -> (k_all, v_all, mask_or_None)`, `advance(T)`; and
    `mark_padding(padding_mask)` before the layers when some tokens are padding.
    A mask of None means "nothing to hide": a fresh causal block (the fused kernel's is_causal)
    or one query that may see every key handed back.
    """

    def __init__(self, config, batch_size: int, max_len: int, *, dtype=torch.float32, device="cpu", static=False):
        self.batch_size, self.max_len = batch_size, max_len
        # static: one-token steps attend over every slot with a mask built from tensors, and the
        # count of cached tokens is a tensor -- so a torch.compile'd step has one shape and
        # compiles once, instead of once per length.
        self.static = static
        self._length = 0
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)  # static mode's count
        self.windows = [
            config.window(i) for i in range(config.n_layer)
        ]
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
        queries may attend to, (B, K, S, D) each, and the mask (B, 1, T, S) or None."""
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

    # --- planning a forward pass, once per layer kind --------------------------------------------
    def _plan(self, window: int | None, positions: torch.Tensor) -> "_Step":
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
            mask = None
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

    def _plan_static_step(self, window: int | None, positions: torch.Tensor) -> "_Step":
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
    mask: torch.Tensor | None
    keep_old: int | None = None  # a block into a wrapping ring: old slots to attend over too
    take: torch.Tensor | None = None  # ... and which of the new tokens the ring keeps
    static: bool = False


# -------------------------------------------------------------------------------------------------
# Samplers: each takes logits (B, V) and returns logits (B, V) with some entries set to -inf
# -------------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on tokens already in the text: positive logits divided, negative multiplied
    (so the token always becomes less likely). seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """OpenAI's presence penalty: subtract a constant from every token already in the text."""
    if penalty == 0.0:
        return logits
    return logits - penalty * seen.to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept too)."""
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: keep the most likely tokens until their probability adds up to p.

    A token is kept when the probability of the tokens strictly more likely than it is below p;
    so the most likely token is always kept, and the set is the smallest that reaches p.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of everything ranked above
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


@dataclass
class SamplingSettings:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0

    def check(self) -> None:
        """Bad settings are a person's mistake: say which and what is allowed."""
        if self.temperature < 0:
            raise TegakiError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise TegakiError(f"top_k must be >= 1 (or None for no limit), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise TegakiError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise TegakiError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise TegakiError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def uses_seen(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0


def sample_next(
    logits: torch.Tensor,
    settings: SamplingSettings,
    *,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) of the last position -> next tokens (B,)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
        logits = apply_presence_penalty(logits, seen, settings.presence_penalty)
    if settings.temperature == 0:
        return logits.argmax(dim=-1)  # greedy: the filters below cannot change the argmax
    logits = logits / settings.temperature
    if settings.top_k is not None:
        logits = top_k_filter(logits, settings.top_k)
    if settings.top_p is not None:
        logits = top_p_filter(logits, settings.top_p)
    if settings.min_p is not None:
        logits = min_p_filter(logits, settings.min_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


# -------------------------------------------------------------------------------------------------
# Batches of prompts of different lengths
# -------------------------------------------------------------------------------------------------


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> input_ids (B, T) padded on the left, attention_mask (B, T)
    (True = real token). Left, so that every row's newest token sits in the same last column and
    the next tokens of all rows are appended together."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TegakiError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[b, T - len(p) :] = True
    return ids, mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, T) positions counting real tokens only: a left-padded row starts at 0 at
    its first real token. Padding gets 0 (masked anyway; 0 keeps it in every table's range)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


# -------------------------------------------------------------------------------------------------
# The decoding loop
# -------------------------------------------------------------------------------------------------


def _check_request(model, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if input_ids.dim() != 2:
        raise TegakiError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise TegakiError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise TegakiError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cfg = model.config
    total = input_ids.shape[1] + max_new_tokens
    if input_ids.shape[1] > cfg.block_size:
        raise TegakiError(
            f"the prompt has {input_ids.shape[1]} tokens, more than the model's context "
            f"(block_size={cfg.block_size}); shorten it"
        )
    if cfg.pos_embedding == "learned" and total > cfg.block_size:
        raise TegakiError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} is beyond "
            f"this model's learned position table (block_size={cfg.block_size}); ask for at most "
            f"{cfg.block_size - input_ids.shape[1]} new tokens or shorten the prompt"
        )
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size:
        raise TegakiError(f"token ids must be in [0, {cfg.vocab_size}), got {int(input_ids.min())}..{int(input_ids.max())}")


@torch.inference_mode()
def generate_tokens(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    decode_step=None,
    prepare: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next tokens (B,) one step at a time. `generate` collects them; the CLI streams.
    prepare: first stack q/k/v and store the weights in their decoding layout
    (`tegaki.fastpath.prepare_for_decoding`: the same weights, read faster; `model.train()`
    undoes it)."""
    settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty)
    settings.check()
    _check_request(model, input_ids, max_new_tokens)
    if prepare:
        prepare_for_decoding(model)
    else:
        drop_stale_stacks(model)  # a compiled step trusts any stack it finds
    if generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    B, T0 = input_ids.shape
    device = input_ids.device
    padded = attention_mask is not None and not bool(attention_mask.all())
    valid = attention_mask.bool() if padded else None
    positions = positions_from_mask(valid) if padded else torch.arange(T0, device=device).expand(B, T0)
    seen = None
    if settings.uses_seen:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids, valid if valid is not None else True)
    if max_new_tokens == 0:
        return

    compiled = decode_step is not None
    cache = None
    if use_cache:
        max_len = T0 + max_new_tokens
        if compiled:  # round up: a later request of a similar length reuses the compiled graph
            max_len = -(-max_len // 256) * 256
        cache = KVCache(model.config, B, max_len, dtype=_cache_dtype(model), device=device, static=compiled)
    step = decode_step if compiled else model

    # Prefill: the whole prompt at once.
    ids, all_valid = input_ids, valid
    logits = model(input_ids, positions=positions, padding_mask=valid, kv_cache=cache, last_only=True)[:, -1]  # (B, V)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    for i in range(max_new_tokens):
        token = sample_next(logits, settings, seen=seen, generator=generator)  # (B,)
        yield token
        if i == max_new_tokens - 1:
            return
        if seen is not None:
            seen[torch.arange(B, device=device), token] = True
        if use_cache:
            # Decode: the new token alone. Without padding the model counts positions itself.
            # A compiled step always gets the positions (it must not read the cache's count).
            logits = step(token[:, None], positions=next_pos if padded or compiled else None, kv_cache=cache)[:, -1]
        else:
            ids = torch.cat([ids, token[:, None]], dim=1)  # (B, T0 + i + 1): recompute everything
            positions = torch.cat([positions, next_pos], dim=1)
            if all_valid is not None:
                all_valid = torch.cat([all_valid, all_valid.new_ones(B, 1)], dim=1)
            logits = model(ids, positions=positions, padding_mask=all_valid, last_only=True)[:, -1]
        next_pos = next_pos + 1


def _cache_dtype(model) -> torch.dtype:
    """Keys and values come out in the activations' dtype: the embedding table's."""
    return model.wte.weight.dtype


def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    stop_tokens: Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    attention_mask: torch.Tensor | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool | str = False,
    prepare: bool = False,
) -> torch.Tensor:
    """Sample max_new_tokens after input_ids (B, T); return (B, T + n) ids, prompt included.

    temperature 0 = greedy. attention_mask (B, T) marks real tokens of a left-padded batch (see
    `left_pad`). A row stops after producing one of `stop_tokens` (kept in the output) or text
    containing one of `stop_strings` (needs `tokenizer` to decode; the token completing it is
    kept); finished rows are filled with pad_id until every row has stopped, and the output is
    cut at the longest row. `compile=True` runs the decode step through torch.compile (a string
    names the backend, e.g. "aot_eager"). `prepare=True` first stacks q/k/v and stores the weights
    in their decoding layout (fastpath.py): faster, the same weights, undone by `model.train()`;
    the default leaves the model's tensors as they are.
    """
    if stop_strings and tokenizer is None:
        raise TegakiError("stop_strings need a tokenizer to decode the generated text")
    B = input_ids.shape[0]
    stop_set = torch.as_tensor(sorted(set(stop_tokens or [])), dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new_tokens: list[torch.Tensor] = []
    step = None
    if compile:
        step = compiled_decode_step(model, compile if isinstance(compile, str) else "inductor")
    tokens = generate_tokens(
        model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        attention_mask=attention_mask, use_cache=use_cache, seed=seed, generator=generator,
        decode_step=step, prepare=prepare,
    )
    check_stops = stop_set.numel() > 0 or bool(stop_strings)
    for token in tokens:
        token = torch.where(done, torch.full_like(token, pad_id), token) if check_stops else token
        new_tokens.append(token)
        if not check_stops:
            continue
        if stop_set.numel():
            done |= torch.isin(token, stop_set)
        if stop_strings:
            history = torch.stack(new_tokens, dim=1)  # (B, n)
            for b in range(B):
                if not done[b] and ends_with_stop_string(tokenizer, history[b].tolist(), stop_strings):
                    done[b] = True
        if bool(done.all()):
            break
    if not new_tokens:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def ends_with_stop_string(tokenizer, new_ids: list[int], stop_strings: Sequence[str]) -> bool:
    """Did the newest token complete one of stop_strings? Only a short tail is decoded: a stop
    string of L characters spans at most 4L bytes, so at most 4L byte-level tokens."""
    tail = new_ids[-(4 * max(len(s) for s in stop_strings) + 1) :]
    text = tokenizer.decode(tail)
    return any(s and s in text for s in stop_strings)


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where the first stop string starts in text, or None."""
    hits = [text.find(s) for s in stop_strings if s and s in text]
    return min(hits) if hits else None


_compiled: dict[tuple[int, str], object] = {}


def compiled_decode_step(model, backend: str = "inductor"):
    """The model's forward through torch.compile, built once per model, for one-token steps on a
    static cache (one shape every step, so it compiles once; the prefill runs eagerly)."""
    key = (id(model), backend)
    if key not in _compiled:
        _compiled[key] = torch.compile(model, dynamic=False, backend=backend)
    return _compiled[key]


# -------------------------------------------------------------------------------------------------
# The `tegaki generate` command
# -------------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample text from a model",
        description="Sample text from a tegaki run folder, a transformers folder, or a hub id.",
    )
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--model", required=True, help="a tegaki run folder, a transformers folder, or a hub id (gpt2)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add after the prompt (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of tokens whose probability reaches p, in (0, 1] (default: off)")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens less likely than min_p x the top token's probability (default: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="make tokens already seen less likely: positive logits divided by it, negative multiplied (> 1 repeats less; default 1.0 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtract this from the logits of tokens already seen (default 0.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="for reproducible samples")
    p.add_argument("--num-samples", type=int, default=1, help="how many continuations to print (default 1)")
    p.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and activations (default fp32)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization of the linear layers")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step: 20-40 s to compile on a small CPU, then ~15%% faster "
                   "per token in fp32 and ~30%% with --quantize int8 (worth it for long outputs)")
    p.add_argument("--stream", action="store_true", help="print text as it is produced")
    p.add_argument("--no-cache", action="store_true", help="recompute every token each step (slow; for checking)")
    p.set_defaults(func=run_generate)


def load_for_generation(name_or_path: str, dtype: torch.dtype):
    """(model, tokenizer) for --model: a tegaki run folder, a transformers folder, or a hub id."""
    from tegaki import load as hf

    model = hf.from_pretrained(name_or_path, dtype=dtype)
    return model.eval(), hf.tokenizer_for(name_or_path)


def run_generate(args) -> int:
    if args.num_samples < 1:
        raise TegakiError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise TegakiError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    settings = SamplingSettings(args.temperature, args.top_k, args.top_p, args.min_p,
                                args.repetition_penalty, args.presence_penalty)
    settings.check()  # before the (slow) load
    if not args.prompt:
        raise TegakiError("the prompt is empty: give some text to continue")
    torch.manual_seed(args.seed if args.seed is not None else int(time.time()))
    model, tok = load_for_generation(args.model, DTYPES[args.dtype])
    if args.quantize:
        from tegaki.quant import quantize_model

        quantize_model(model, args.quantize)
    prepare_for_decoding(model)  # this model only decodes: q/k/v stacked, decoding layouts
    prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        raise TegakiError("the prompt encodes to no tokens")
    cfg = model.config
    if len(prompt_ids) > cfg.block_size:
        raise TegakiError(
            f"the prompt is {len(prompt_ids)} tokens, longer than the model's context of {cfg.block_size}; shorten it"
        )
    max_new = args.max_new_tokens
    if cfg.pos_embedding == "learned" and len(prompt_ids) + max_new > cfg.block_size:
        max_new = cfg.block_size - len(prompt_ids)
        print(f"(max-new-tokens lowered to {max_new}: the model's context is {cfg.block_size} tokens)", file=sys.stderr)
    if max_new < 1:
        raise TegakiError(f"the prompt fills the model's whole context ({cfg.block_size} tokens); shorten it")
    stop_tokens = [tok.eot_id] if getattr(tok, "eot_id", None) is not None else []
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    input_ids = torch.tensor([prompt_ids])
    step = compiled_decode_step(model) if args.compile else None
    for n in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {n + 1} ---")
        _print_one(model, tok, input_ids, max_new, settings, stop_tokens, args, generator, step)
    return 0


def _print_one(model, tok, input_ids, max_new, settings, stop_tokens, args, generator, step) -> None:
    """Generate one sample; print it (streamed piece by piece with --stream), cut at a --stop."""
    tokens = generate_tokens(
        model, input_ids, max_new, temperature=settings.temperature, top_k=settings.top_k,
        top_p=settings.top_p, min_p=settings.min_p, repetition_penalty=settings.repetition_penalty,
        presence_penalty=settings.presence_penalty, use_cache=not args.no_cache, generator=generator,
        decode_step=step,
    )

    def ids():
        for token in tokens:
            t = int(token[0])
            if t in stop_tokens:
                return
            yield t

    out = sys.stdout
    out.write(args.prompt)
    if args.stream:
        out.flush()
    text = ""
    printed = 0
    hold = max((len(s) for s in args.stop), default=1) - 1  # text that might begin a stop string
    for piece in tok.stream_decode(ids()):
        text += piece
        cut = find_stop(text, args.stop)
        if cut is not None:
            text = text[:cut]
            break
        if args.stream and len(text) - hold > printed:
            out.write(text[printed : len(text) - hold])
            out.flush()
            printed = len(text) - hold
    out.write(text[printed:] + "\n")
    out.flush()
