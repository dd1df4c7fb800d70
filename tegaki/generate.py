"""Generation: the decoding loop -- prefill the prompt, then one token a step through the KV cache.

`Decoding` is the loop's state and its one step (the model, the cache, sampling); `generate_tokens`
drives it and yields the next tokens step by step (the CLI streams them), and the server's engine
drives one per request. `generate` collects the tokens, stops rows at stop tokens or stop strings,
and returns the ids; `StopText` cuts streamed text at a stop string. Everything here drives any
model whose forward takes (input_ids, positions=, padding_mask=, kv_cache=, last_only=) --
`GPT.generate` hands itself to `generate`; nothing here imports the model. The cache is
`kv_cache.py`, the samplers `sampling.py`.
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


def cache_dtype(model) -> torch.dtype:
    """The KV cache's dtype: keys and values come out in the activations' dtype, the embedding table's."""
    return model.wte.weight.dtype


class Decoding:
    """One batch of prompts being continued: its KV cache, the positions of its next tokens, the
    tokens each row has seen (for the penalties) and the step that feeds one token through the model.

        logits = decoding.prefill()          # the whole prompt at once: logits (B, V) after it
        token = decoding.sample(logits)      # each row's next token (B,)
        logits = decoding.step(token)        # that token through the model: the logits after it

    `generate_tokens` drives it for a batch; the server's engine drives one per request, a step at
    a time between the other requests' steps. use_cache=False recomputes the whole text every step:
    the readable twin the cache is checked against. decode_step: a compiled twin of the model for
    one-token steps (`compiled_decode_step`), run on a static cache.
    """

    def __init__(
        self,
        model,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        sampling: SamplingSettings = DEFAULT_SAMPLING,
        *,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        decode_step=None,
    ):
        sampling.check()
        check_request(model.config, input_ids, max_new_tokens)
        self.model, self.input_ids, self.max_new_tokens = model, input_ids, max_new_tokens
        self.sampling, self.generator, self.use_cache, self.decode_step = sampling, generator, use_cache, decode_step
        B, T0 = input_ids.shape
        self.padded = attention_mask is not None and not bool(attention_mask.all())
        self.valid = attention_mask.bool() if self.padded else None  # (B, T) real tokens, or None: all are
        if self.padded:
            self.positions = positions_from_mask(self.valid)  # (B, T0)
        else:
            self.positions = torch.arange(T0, device=input_ids.device).expand(B, T0)
        self.seen = None  # (B, V) bool: tokens in each row's text so far
        if sampling.uses_seen:
            self.seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=input_ids.device)
            self.seen.scatter_(1, input_ids, self.valid if self.valid is not None else True)
        self.cache: KVCache | None = None
        self.ids, self.all_valid = input_ids, self.valid  # the whole text, for use_cache=False
        self.next_pos = self.positions[:, -1:] + 1  # (B, 1)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """The prompt through the model (filling the cache): the logits (B, V) of each row's next token."""
        model, (B, T0) = self.model, self.input_ids.shape
        compiled = self.decode_step is not None
        self.step_fn = self.decode_step if compiled else model
        if self.use_cache:
            max_len = T0 + self.max_new_tokens
            if compiled:  # round up: a later request of a similar length reuses the compiled graph
                max_len = -(-max_len // 256) * 256
            self.cache = KVCache(
                model.config, B, max_len, dtype=cache_dtype(model), device=self.input_ids.device, static=compiled
            )
            if compiled and self.input_ids.device.type == "cuda" and graph_capturable(model):
                self.step_fn = CudaGraphStep(self.decode_step, self.cache)  # the whole step as one CUDA graph
        return model(
            self.input_ids, positions=self.positions, padding_mask=self.valid, kv_cache=self.cache, last_only=True
        )[:, -1]  # (B, V)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token (B,) from logits (B, V), under the sampling settings."""
        token = sample_next(logits, self.sampling, seen=self.seen, generator=self.generator)  # (B,)
        if self.seen is not None:
            self.seen[torch.arange(token.shape[0], device=token.device), token] = True
        return token

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) through the model after the text so far: the logits (B, V) of the next one."""
        positions, self.next_pos = self.next_pos, self.next_pos + 1
        if self.use_cache:
            # The new token alone. Without padding the model counts positions itself; a compiled
            # step always gets them (it must not read the cache's count).
            given = positions if self.padded or self.decode_step is not None else None
            return self.step_fn(token[:, None], positions=given, kv_cache=self.cache)[:, -1]
        B = token.shape[0]
        self.ids = torch.cat([self.ids, token[:, None]], dim=1)  # (B, T0 + i + 1): recompute everything
        self.positions = torch.cat([self.positions, positions], dim=1)
        if self.all_valid is not None:
            self.all_valid = torch.cat([self.all_valid, self.all_valid.new_ones(B, 1)], dim=1)
        return self.model(self.ids, positions=self.positions, padding_mask=self.all_valid, last_only=True)[:, -1]


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
    if generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    decoding = Decoding(
        model,
        input_ids,
        max_new_tokens,
        sampling,
        attention_mask=attention_mask,
        use_cache=use_cache,
        generator=generator,
        decode_step=decode_step,
    )
    if max_new_tokens == 0:
        return
    logits = decoding.prefill()
    for i in range(max_new_tokens):
        token = decoding.sample(logits)
        yield token
        if i < max_new_tokens - 1:
            logits = decoding.step(token)


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

    Tokens are drawn by `sampling=SamplingSettings(...)` or its fields as keywords (temperature=0:
    greedy). attention_mask marks the real tokens of a left-padded batch (`left_pad`). A row stops
    after one of stop_tokens or once its text holds one of stop_strings (decoded with tokenizer);
    finished rows are filled with pad_id and the output is cut at the longest row. On the CPU the
    linear layers run, for this call, on the decoding layer (`decoding.py`). compile=True (or a
    backend's name) runs the one-token steps through torch.compile (`compiled_decode_step`).
    """
    if sampling is not None and sampling_keywords:
        raise TegakiError("give either sampling=SamplingSettings(...) or its fields as keywords, not both")
    settings = sampling or SamplingSettings.from_keywords(**sampling_keywords)
    if stop_strings and tokenizer is None:
        raise TegakiError("stop_strings need a tokenizer to decode the generated text")
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
    stops = RowStops(input_ids.shape[0], stop_tokens, stop_strings, tokenizer, input_ids.device)
    new_tokens: list[torch.Tensor] = []
    with decoding_layout(model):
        for token in tokens:
            new_tokens.append(stops.padded(token, pad_id))
            if stops.update(new_tokens):
                break
        tokens.close()  # the loop ends inside the layout, whether it ran out or stopped early
    if not new_tokens:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


# -------------------------------------------------------------------------------------------------
# Stopping: at a token, or at a text
# -------------------------------------------------------------------------------------------------


class RowStops:
    """Which rows of a batch have stopped: after one of stop_tokens, or once the text they made
    holds one of stop_strings."""

    def __init__(self, batch_size: int, stop_tokens, stop_strings, tokenizer, device):
        self.stop_set = torch.as_tensor(sorted(set(stop_tokens or [])), dtype=torch.long, device=device)
        self.stop_strings, self.tokenizer = list(stop_strings or []), tokenizer
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.active = self.stop_set.numel() > 0 or bool(self.stop_strings)

    def padded(self, token: torch.Tensor, pad_id: int) -> torch.Tensor:
        """token (B,) with pad_id in the rows already finished."""
        return torch.where(self.done, torch.full_like(token, pad_id), token) if self.active else token

    def update(self, new_tokens: list[torch.Tensor]) -> bool:
        """Mark the rows the newest token finishes; True once every row has."""
        if not self.active:
            return False
        if self.stop_set.numel():
            self.done |= torch.isin(new_tokens[-1], self.stop_set)
        if self.stop_strings:
            history = torch.stack(new_tokens, dim=1)  # (B, n)
            for b in range(history.shape[0]):
                if not self.done[b] and ends_with_stop_string(self.tokenizer, history[b].tolist(), self.stop_strings):
                    self.done[b] = True
        return bool(self.done.all())


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where the first stop string starts in text, or None."""
    hits = [text.find(s) for s in stop_strings if s and s in text]
    return min(hits) if hits else None


def ends_with_stop_string(tokenizer, new_ids: list[int], stop_strings: Sequence[str]) -> bool:
    """Did the newest token complete one of stop_strings? Only a short tail is decoded: a stop
    string of L characters spans at most 4L bytes, so at most 4L byte-level tokens."""
    tail = new_ids[-(4 * max(len(s) for s in stop_strings) + 1) :]
    return find_stop(tokenizer.decode(tail), stop_strings) is not None


class StopText:
    """Text arriving piece by piece, cut before the first stop string. What `add` hands back may be
    shown at once: the last few characters are held back while more may come, since they could be
    the start of a stop string not yet complete. The one stop-text rule of `tegaki generate`, the
    server's choices and `tegaki chat`."""

    def __init__(self, stop_strings: Sequence[str]):
        self.stop_strings = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.text = ""  # everything so far, up to a stop string
        self.sent = 0  # characters of text already handed out
        self.stopped = False  # a stop string was found

    def add(self, piece: str, final: bool = False) -> str:
        """Add text; return what may be handed out now (final: all the rest)."""
        if self.stopped:
            return ""
        self.text += piece
        cut = find_stop(self.text, self.stop_strings)
        if cut is not None:
            self.text, self.stopped, final = self.text[:cut], True, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        ready, self.sent = self.text[self.sent : end], end
        return ready


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
