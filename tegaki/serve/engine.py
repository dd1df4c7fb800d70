"""The engine: one thread owns the model, and the requests under way take turns, one token each.

Why turns and not one batched forward for all of them? A batch pads prompts of different lengths and
runs different matrix shapes, which moves the logits in their last bits (about 1e-6 on the tiny
presets); a sampled token sitting on a probability boundary then flips, and a request's answer would
depend on who else was asking at the time. Taking turns keeps every request exactly what it is alone
(batch of one, its own KV cache, its own seeded generator), so a seeded request is reproducible under
any load -- tests/test_serve.py fires requests at once and compares each with a lone run. The cost:
on a GPU a batch would decode several requests for the price of one; on a CPU the gain is small.
Time to first token stays short under load because a new request joins the rotation at the next turn
instead of waiting for the others to finish.

The loop, on the engine thread:

    take new work     requests join (up to max_active at once; the rest wait);
                      calls (the page's analysis) run here, between steps, never beside a step
    one turn          every active request: prefill on its first turn, else decode its last
                      token; sample; hand the token to its sink; finish on a stop token or the limit

Fair shares: the requests of one API call (a prompt list times n) form a group. A free place goes
to the waiting request whose group holds the fewest places (the oldest among equals), and a group
with none gets a place at once, over max_active (up to twice it), while another group holds two or
more: so a one-token request sent after sixteen prompts with n=16 is answered at the next turn, not
after 248 others. Work in all is bounded too: `submit_all` refuses (EngineFull) beyond max_queued.

Sinks are plain callables, so the HTTP app can hop back onto its event loop and the terminal chat
can read from a queue. A request cancelled by its reader (a client that went away) is dropped at its
next turn: no more work is spent on it.
"""

from __future__ import annotations

import concurrent.futures
import queue
import random
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from tegaki.errors import TegakiError
from tegaki.generate import Decoding, check_request
from tegaki.sampling import SamplingSettings

# -------------------------------------------------------------------------------------------------
# What goes in and what comes out
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One continuation of one prompt (an API request with n=3 is three of these)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    seed: int | None = None  # None: a fresh random seed
    stop_ids: frozenset[int] = frozenset()  # tokens that end the reply (not part of its text)
    top_logprobs: int = 0  # how many alternatives to report with each token


@dataclass
class TokenEvent:
    """One sampled token. text is what it releases: "" while a character is still incomplete
    (a Japanese character is often two or three byte-level tokens), more than its own bytes after."""

    token_id: int
    text: str
    logprob: float  # log of its probability under the model (temperature 1, no filters)
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class DoneEvent:
    """The end of a request: reason is "stop" (a stop token), "length" (max_tokens), "cancelled"
    or "error". text holds bytes still held back by the UTF-8 decoder (usually "")."""

    reason: str
    text: str = ""
    completion_tokens: int = 0
    message: str = ""


Event = TokenEvent | DoneEvent


def token_piece(tokenizer, token_id: int) -> str:
    """One token as text for logprobs. A token holding part of a character is written as its bytes,
    the way OpenAI's API does ("bytes:\\xe3\\x81"), instead of a replacement character."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


# -------------------------------------------------------------------------------------------------
# One request under way
# -------------------------------------------------------------------------------------------------


class Job:
    """A request in the engine: its decoding (cache and sampling state), its generator, where its tokens go."""

    def __init__(self, request: GenerationRequest, sink: Callable[[Event], None], tokenizer, device, group):
        self.request, self.sink, self.group = request, sink, group  # group: the API call it belongs to
        seed = request.seed if request.seed is not None else random.randrange(2**63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.decoder = tokenizer.stream_decoder()  # UTF-8 safe: never half a character
        self.decoding: Decoding | None = None  # made at the first turn (prefill): the cache lives from then
        self.last_token: torch.Tensor | None = None  # (1,)
        self.generated = 0
        self.cancelled = False  # set from any thread; read by the engine at the job's next turn

    def cancel(self) -> None:
        self.cancelled = True


# -------------------------------------------------------------------------------------------------
# The engine
# -------------------------------------------------------------------------------------------------


MAX_ACTIVE = 8  # requests decoding at once; more wait
MAX_QUEUED = 256  # requests in the engine at once, decoding or waiting; more are refused


class EngineFull(TegakiError):
    """The engine holds max_queued requests already: try again when some have finished."""


class Engine:
    """Owns the model on one thread. `submit` a request with a sink (`submit_all` several, as one
    group); `stream` to read one in order; `call` to run any function of the model between steps
    (the page's analysis uses it)."""

    def __init__(self, model, tokenizer, max_active: int = MAX_ACTIVE, max_queued: int = MAX_QUEUED):
        if max_active < 1 or max_queued < 1:
            raise TegakiError(f"max_active and max_queued must be >= 1, got {max_active} and {max_queued}")
        self.model, self.tokenizer, self.max_active, self.max_queued = model.eval(), tokenizer, max_active, max_queued
        self.inbox: queue.Queue = queue.Queue()  # Jobs and calls, from any thread
        self.waiting: deque[Job] = deque()  # admitted by fair shares as places free up
        self.active: list[Job] = []
        self.queued = 0  # jobs submitted and not yet finished (inbox, waiting, active)
        self._queued_lock = threading.Lock()
        self.stats = {"requests": 0, "tokens": 0, "cancelled": 0}  # read by /health and the tests
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="tegaki-engine", daemon=True)
        self._thread.start()

    # --- from any thread ---------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> Job:
        """Queue a request; its events go to sink(event), called on the engine thread."""
        return self.submit_all([(request, sink)])[0]

    def submit_all(self, work: list[tuple[GenerationRequest, Callable[[Event], None]]]) -> list[Job]:
        """Queue requests as one group (one API call), all or none: every one is checked first, and
        EngineFull is raised when they would take the engine past max_queued."""
        if self._closing:
            raise TegakiError("the engine is shutting down")
        for request, _ in work:
            if request.max_tokens < 1:
                raise TegakiError(f"max_tokens must be >= 1, got {request.max_tokens}")
            # The library's own checks (context, learned positions, ids in the vocabulary), up front.
            check_request(self.model.config, torch.tensor([request.prompt_ids]), request.max_tokens)
        with self._queued_lock:
            if self.queued + len(work) > self.max_queued:
                raise EngineFull(
                    f"the server holds {self.queued} sequences already and takes {self.max_queued} at most; "
                    f"these {len(work)} would pass that. Try again shortly."
                )
            self.queued += len(work)
        group = object()
        jobs = [Job(request, sink, self.tokenizer, self.model.device, group) for request, sink in work]
        for job in jobs:
            self.inbox.put(job)
        return jobs

    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        """The events of one request, in order, for a caller on another thread. Leaving the loop
        early (break, an exception) cancels the request."""
        events: queue.Queue = queue.Queue()
        job = self.submit(request, events.put)
        try:
            while True:
                event = events.get()
                yield event
                if isinstance(event, DoneEvent):
                    return
        finally:
            job.cancel()

    def call(self, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
        """Run fn(*args, **kwargs) on the engine thread between two steps. The analysis code hooks
        into the model and switches its attention path while it runs; here no step sees that."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put((future, fn, args, kwargs))
        return future

    def close(self) -> None:
        self._closing = True
        self.inbox.put(None)  # wake the loop if it sleeps
        self._thread.join(timeout=10)

    @property
    def busy(self) -> int:
        return len(self.active) + len(self.waiting)

    # --- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closing:
            self._take_new_work(block=not self.active and not self.waiting)
            self._turns()
        for job in self.active + list(self.waiting):  # shutting down: tell every reader
            self._release(job)
            self._emit(job, DoneEvent("cancelled", completion_tokens=job.generated, message="shutting down"))

    def _turns(self) -> None:
        """One turn for every active request. A method of its own so that its loop variable dies
        with it: left in _loop, the last job would stay referenced while the engine waits for work,
        and through its sink the whole API request (every choice's job and unread events)."""
        for job in list(self.active):
            self._turn(job)

    def _take_new_work(self, block: bool) -> None:
        """Move everything in the inbox: jobs to the waiting line, calls run now. Then drop the
        cancelled from the line and fill the free places by fair shares."""
        try:
            item = self.inbox.get(timeout=1.0) if block else self.inbox.get_nowait()
            while True:
                if isinstance(item, Job):
                    self.waiting.append(item)
                elif item is not None:
                    self._run_call(*item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass
        for job in [job for job in self.waiting if job.cancelled]:  # its reader has gone: no place for it
            self.waiting.remove(job)
            self.stats["cancelled"] += 1
            self._release(job)
            self._emit(job, DoneEvent("cancelled"))
        while self.waiting:
            held = Counter(job.group for job in self.active)
            job = min(self.waiting, key=lambda waiting: held[waiting.group])  # min keeps the oldest of equals
            if len(self.active) >= self.max_active and not self._over_share(held, job):
                break
            self.waiting.remove(job)
            self.active.append(job)

    def _over_share(self, held: Counter, job: Job) -> bool:
        """Whether job may take a place beyond max_active: its group holds none while another holds
        two or more (within twice max_active, which bounds the memory of the caches)."""
        return held[job.group] == 0 and max(held.values(), default=0) >= 2 and len(self.active) < 2 * self.max_active

    @staticmethod
    def _run_call(future, fn, args, kwargs) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who decides what it means
            future.set_exception(e)

    @torch.inference_mode()
    def _turn(self, job: Job) -> None:
        """One token for one request (its whole prompt first, on its first turn)."""
        if job.cancelled:
            self.stats["cancelled"] += 1
            return self._finish(job, "cancelled")
        try:
            logits = self._next_logits(job)  # (1, V)
            token = job.decoding.sample(logits)  # (1,)
        except Exception as e:  # noqa: BLE001 - one request failing must not stop the others
            return self._finish(job, "error", message=f"{type(e).__name__}: {e}")
        job.last_token, job.generated = token, job.generated + 1
        self.stats["tokens"] += 1
        token_id = int(token[0])
        if token_id in job.request.stop_ids:  # the end of the reply: no text of its own
            return self._finish(job, "stop")
        self._emit(job, self._token_event(job, logits, token_id))
        if job.generated >= job.request.max_tokens:
            self._finish(job, "length")

    def _next_logits(self, job: Job) -> torch.Tensor:
        """Prefill on the first turn, then one-token steps: the loop of `tegaki.generate`
        (`Decoding`) for a batch of one, driven a turn at a time (tests hold the tokens equal)."""
        if job.decoding is None:
            request = job.request
            ids = torch.tensor([request.prompt_ids], device=self.model.device)  # (1, T)
            job.decoding = Decoding(self.model, ids, request.max_tokens, request.sampling, generator=job.generator)
            return job.decoding.prefill()  # (1, V)
        return job.decoding.step(job.last_token)  # (1, V)

    def _token_event(self, job: Job, logits: torch.Tensor, token_id: int) -> TokenEvent:
        """The token, the text it releases, and its log-probability (and the alternatives') under
        the model itself: what the model thought, whatever the sampling settings did."""
        logprobs = logits[0].float().log_softmax(dim=-1)  # (V,)
        top = []
        if job.request.top_logprobs:
            best = logprobs.topk(min(job.request.top_logprobs, logprobs.numel()))
            top = [(int(i), float(lp)) for lp, i in zip(best.values, best.indices)]
        return TokenEvent(token_id, job.decoder.push(token_id), float(logprobs[token_id]), top)

    def _finish(self, job: Job, reason: str, message: str = "") -> None:
        self.active.remove(job)
        self._release(job)
        job.decoding = None  # free its cache now, not when the reader lets go
        if reason in ("stop", "length"):
            self.stats["requests"] += 1
        self._emit(job, DoneEvent(reason, job.decoder.flush(), job.generated, message))

    def _release(self, job: Job) -> None:
        with self._queued_lock:
            self.queued -= 1

    @staticmethod
    def _emit(job: Job, event: Event) -> None:
        """Hand an event to the job's reader. A reader that can no longer take it (its event loop
        closed) cancels the job; it must never stop the engine's thread."""
        try:
            job.sink(event)
        except Exception:  # noqa: BLE001 - whatever the reader's failure, the other requests go on
            job.cancel()
