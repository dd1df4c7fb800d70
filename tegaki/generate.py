"""Generation: the decoding loop -- prefill the prompt, then one token a step through the KV cache.

`generate_tokens` yields the next tokens step by step (the CLI streams them); `generate` collects
them, stops rows at stop tokens or stop strings, and returns the ids. Both drive any model whose
forward takes (input_ids, positions=, padding_mask=, kv_cache=, last_only=) -- `GPT.generate`
hands itself to `generate`; nothing here imports the model. The cache is `kv_cache.py`, the
samplers `sampling.py`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch

from tegaki.decoding import CompiledCpuStep, decoding_layout
from tegaki.errors import TegakiError
from tegaki.kv_cache import KVCache
from tegaki.sampling import SamplingSettings, sample_next

DEFAULT_SAMPLING = SamplingSettings()  # plain softmax sampling at temperature 1 (frozen: safe to share)


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


def check_request(config, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """Refuse, with the reason, a request the model cannot serve: before any work is done."""
    if input_ids.dim() != 2:
        raise TegakiError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise TegakiError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise TegakiError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    T = input_ids.shape[1]
    if config.block_size < T:
        raise TegakiError(
            f"the prompt has {T} tokens, more than the model's context (block_size={config.block_size}); shorten it"
        )
    if config.max_positions is not None and T + max_new_tokens > config.max_positions:
        raise TegakiError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} is beyond "
            f"this model's learned position table (block_size={config.block_size}); ask for at most "
            f"{config.max_positions - T} new tokens or shorten the prompt"
        )
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size:
        raise TegakiError(
            f"token ids must be in [0, {config.vocab_size}), got {int(input_ids.min())}..{int(input_ids.max())}"
        )


@torch.inference_mode()
def generate_tokens(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingSettings = DEFAULT_SAMPLING,
    *,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    decode_step=None,
) -> Iterator[torch.Tensor]:
    """Yield the next tokens (B,) one step at a time. `generate` collects them; the CLI streams.
    decode_step: a compiled twin of the model for one-token steps (see `compiled_decode_step`)."""
    settings = sampling
    settings.check()
    check_request(model.config, input_ids, max_new_tokens)
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
    if compiled and use_cache and device.type == "cuda" and graph_capturable(model):
        step = CudaGraphStep(decode_step, cache)  # the whole step replayed as one CUDA graph

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
    stop_tokens: Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    attention_mask: torch.Tensor | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool | str = False,
    sampling: SamplingSettings | None = None,
    **sampling_keywords,
) -> torch.Tensor:
    """Sample max_new_tokens after input_ids (B, T); return (B, T + n) ids, prompt included.

    How tokens are drawn: `sampling=SamplingSettings(...)`, or its fields as keywords
    (temperature=0 for greedy, top_k, top_p, min_p, repetition_penalty, presence_penalty).
    attention_mask (B, T) marks real tokens of a left-padded batch (see `left_pad`). A row stops
    after producing one of `stop_tokens` (kept in the output) or text containing one of
    `stop_strings` (needs `tokenizer` to decode; the token completing it is kept); finished rows are
    filled with pad_id until every row has stopped, and the output is cut at the longest row.
    On the CPU the linear layers multiply through the decoding layer (`decoding.py`): for this
    call only, each on the kernel measured fastest on this machine for its shape (the same logits up
    to the order of the additions); the model is as it was afterwards. A model prepared for good
    (`decoding.prepare_for_decoding`) keeps the paths it has. `compile=True` runs the decode step
    through torch.compile (a string names the backend, e.g. "aot_eager", which runs the traced
    graph without code generation: for checking); a compiled step is built once per model for the
    layers it has, so on a CPU it prepares the model for decoding for good (`CompiledCpuStep`).
    """
    if sampling is not None and sampling_keywords:
        raise TegakiError("give either sampling=SamplingSettings(...) or its fields as keywords, not both")
    settings = sampling or SamplingSettings.from_keywords(**sampling_keywords)
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
        model,
        input_ids,
        max_new_tokens,
        settings,
        attention_mask=attention_mask,
        use_cache=use_cache,
        seed=seed,
        generator=generator,
        decode_step=step,
    )
    check_stops = stop_set.numel() > 0 or bool(stop_strings)
    with decoding_layout(model):
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
        tokens.close()  # the loop ends inside the layout, whether it ran out or stopped early
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
    static cache (one shape every step, so it compiles once; the prefill runs eagerly). On a CPU,
    the decoding layer's compiled step (`decoding.CompiledCpuStep`)."""
    key = (id(model), backend)
    if key not in _compiled:
        if next(model.parameters()).device.type == "cpu":
            _compiled[key] = CompiledCpuStep(model, backend)
        else:
            _compiled[key] = torch.compile(model, dynamic=False, backend=backend)
    return _compiled[key]


# -------------------------------------------------------------------------------------------------
# A decode step as a CUDA graph
# -------------------------------------------------------------------------------------------------
# A one-token step of a small model is a few hundred tiny GPU kernels, and launching them from
# Python takes longer than running them. A CUDA graph records the launches once and replays them
# with one call. What makes the step recordable: one shape every step (the static cache), no
# number read back to the CPU (positions are given; the static cache counts on the GPU), and every
# tensor it reads living at a fixed address (the inputs are copied into buffers the graph owns).


def graph_capturable(model) -> bool:
    """MoE's readable loop asks, per expert, which tokens chose it: a shape known only on the CPU
    after a sync, which no graph can record (moe_impl="dense" can)."""
    return not (model.config.mlp == "moe" and model.config.moe_impl == "loop")


class CudaGraphStep:
    """`step(token (B, 1), positions=(B, 1), kv_cache=cache)` like the model's forward, for one
    static cache: the first call runs eagerly (warming up kernels and allocator), the second records
    the step as a CUDA graph, every call from then on replays it."""

    def __init__(self, step, cache):
        self.step, self.cache = step, cache
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.token: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.step_eagerly = False

    def __call__(self, token: torch.Tensor, *, positions: torch.Tensor, kv_cache) -> torch.Tensor:
        if kv_cache is not self.cache:
            raise ValueError("a CUDA graph step is bound to the cache it was recorded with")
        self.calls += 1
        if self.calls == 1:  # eager, on a side stream: the warm-up a capture needs
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(token, positions=positions, kv_cache=kv_cache)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.token, self.positions = token.clone(), positions.clone()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):  # records, computes nothing yet
                    self.logits = self.step(self.token, positions=self.positions, kv_cache=kv_cache)
            except RuntimeError as e:  # something in the step cannot be recorded: run it as it is
                warnings.warn(f"decoding without a CUDA graph: the step could not be recorded ({e})", stacklevel=2)
                self.step_eagerly = True
                kv_cache.abandon_step()
            self.graph = graph
        if self.step_eagerly:
            return self.step(token, positions=positions, kv_cache=kv_cache)
        self.token.copy_(token)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits
