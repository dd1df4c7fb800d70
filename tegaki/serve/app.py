"""The ASGI app: OpenAI's endpoints, the page and its data, and errors as OpenAI-shaped JSON.

    GET  /health                  {"status": "ok", ...}: the model, requests under way, counters
    GET  /v1/models               the one model served
    POST /v1/completions          text in, text out (streamed as server-sent events with stream=true)
    POST /v1/chat/completions     messages through the chat template (see templates.py)
    GET  /                        the page (static/index.html) and its files under /static/
    GET  /api/model               the page's header: config, chat template, parameter table
    POST /api/next                next-token bars for a text under given sampling settings
    POST /api/attention           every head of one layer
    POST /api/lens                the logit lens
    POST /api/trace               `tegaki trace --json`

Streams end with `data: [DONE]`. A client that goes away mid-stream cancels its requests: Starlette
cancels the response's task, and the `finally` below tells the engine, which drops them at their next
turn. Nothing here touches the model directly: generation goes through the engine, the page's
analysis through `Engine.call`, so both run on the engine's one thread.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tegaki.errors import TegakiError
from tegaki.serve import api, insides
from tegaki.serve.api import ApiError, ChoiceText, Params, Served
from tegaki.serve.engine import DoneEvent, Engine, TokenEvent

STATIC = Path(__file__).parent / "static"


def create_app(served: Served, engine: Engine) -> Starlette:
    """The app for one served model; the caller owns the engine (and closes it)."""
    routes = [
        Route("/health", lambda r: _health(served, engine), methods=["GET"]),
        Route("/v1/models", lambda r: JSONResponse(api.models_list(served)), methods=["GET"]),
        Route("/v1/completions", _endpoint(served, engine, "completion"), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(served, engine, "chat"), methods=["POST"]),
        Route("/", lambda r: FileResponse(STATIC / "index.html"), methods=["GET"]),
        Route("/api/model", _page_data(engine, lambda body: _model_info(served)), methods=["GET"]),
        Route("/api/next", _page_data(engine, lambda body: _next(served, body)), methods=["POST"]),
        Route("/api/attention", _page_data(engine, lambda body: _attention(served, body)), methods=["POST"]),
        Route("/api/lens", _page_data(engine, lambda body: _lens(served, body)), methods=["POST"]),
        Route("/api/trace", _page_data(engine, lambda body: _trace(served, body)), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {ApiError: _api_error, TegakiError: _tegaki_error, HTTPException: _http_error, Exception: _crash}
    return Starlette(routes=routes, exception_handlers=handlers)


# -------------------------------------------------------------------------------------------------
# Errors: always JSON in OpenAI's shape, never a traceback
# -------------------------------------------------------------------------------------------------


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _tegaki_error(request: Request, e: TegakiError) -> JSONResponse:
    return JSONResponse(ApiError(400, str(e)).body(), status_code=400)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {e.detail}"
    return JSONResponse(ApiError(e.status_code, message, kind=kind).body(), status_code=e.status_code)


async def _crash(request: Request, e: Exception) -> JSONResponse:
    # A bug in tegaki, not the request's fault: say what, without the traceback.
    message = f"internal error: {type(e).__name__}: {e}"
    return JSONResponse(ApiError(500, message, kind="server_error").body(), status_code=500)


async def read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _health(served: Served, engine: Engine) -> JSONResponse:
    return JSONResponse(
        {
            "status": "ok",
            "model": served.name,
            "active": len(engine.active),
            "waiting": len(engine.waiting),
            **engine.stats,
        }
    )


# -------------------------------------------------------------------------------------------------
# Generation
# -------------------------------------------------------------------------------------------------


def _endpoint(served: Served, engine: Engine, kind: str):
    async def endpoint(request: Request):
        body = await read_json(request)
        params = api.completion_params(body, served) if kind == "completion" else api.chat_params(body, served)
        run = Run(engine, params)  # submits now, so a request the engine refuses is a 400, not a broken stream
        if params.stream:
            return StreamingResponse(_stream(served, run, params, kind), media_type="text/event-stream")
        return JSONResponse(await _collect(served, run, params, kind, request))

    return endpoint


class Run:
    """The engine requests of one API request (one per choice), their events on this event loop."""

    def __init__(self, engine: Engine, params: Params):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.jobs = []
        try:
            for i, request in enumerate(params.requests):
                self.jobs.append(engine.submit(request, self._sink(loop, i)))
        except TegakiError as e:
            self.cancel()
            raise ApiError(400, str(e)) from None
        self.choices = [ChoiceText(params.stop) for _ in params.requests]
        self.open = len(self.jobs)

    def _sink(self, loop, index: int):
        def sink(event):  # called on the engine thread: hop over to the event loop
            loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

        return sink

    async def next(self) -> tuple[int, TokenEvent | DoneEvent]:
        """The next event of any choice; a text that reaches a stop string cancels its choice."""
        i, event = await self.events.get()
        choice = self.choices[i]
        if isinstance(event, TokenEvent):
            choice.tokens.append(event)
        else:
            self.open -= 1
            choice.completion_tokens = event.completion_tokens
            if event.reason == "error":
                raise ApiError(500, f"generation failed: {event.message}", kind="server_error")
            choice.finish_reason = "length" if event.reason == "length" and not choice.stopped else "stop"
        return i, event

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()


async def _collect(served: Served, run: Run, params: Params, kind: str, request: Request) -> dict:
    """A whole (not streamed) answer. A client that hangs up stops the work here too."""
    try:
        while run.open:
            try:
                i, event = await asyncio.wait_for(run.next(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return {}
                continue
            run.choices[i].add(event.text, final=isinstance(event, DoneEvent))
            if run.choices[i].stopped:
                run.jobs[i].cancel()
    finally:
        run.cancel()
    respond = api.completion_response if kind == "completion" else api.chat_response
    return respond(served, api.new_id("cmpl" if kind == "completion" else "chatcmpl"), run.choices, params)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(served: Served, run: Run, params: Params, kind: str):
    """Server-sent events: one chunk per piece of text (per token when logprobs are asked for)."""
    rid = api.new_id("cmpl" if kind == "completion" else "chatcmpl")
    offsets = [0] * len(run.choices)

    def chunk(i: int, text: str, events, finish=None) -> str:
        if kind == "completion":
            c = api.completion_chunk(served, rid, i, text, events, finish, offsets[i])
        else:
            c = api.chat_chunk(served, rid, i, {"content": text} if text or finish is None else {}, events, finish)
        offsets[i] += len(text)
        return _sse(c)

    try:
        if kind == "chat":  # OpenAI's first chunk of each choice carries the role
            for i in range(len(run.choices)):
                yield _sse(api.chat_chunk(served, rid, i, {"role": "assistant", "content": ""}, None))
        while run.open:
            try:
                i, event = await run.next()
            except ApiError as e:
                yield _sse(e.body())
                break
            choice = run.choices[i]
            text = choice.add(event.text, final=isinstance(event, DoneEvent))
            with_logprobs = params.logprobs is not None and isinstance(event, TokenEvent)
            if isinstance(event, DoneEvent):
                yield chunk(i, text, [] if params.logprobs is not None else None, choice.finish_reason)
            elif text or with_logprobs:
                yield chunk(i, text, [event] if with_logprobs else None)
            if choice.stopped:
                run.jobs[i].cancel()
        if params.include_usage:
            total = sum(c.completion_tokens for c in run.choices)
            object_kind = "text_completion" if kind == "completion" else "chat.completion.chunk"
            yield _sse(api.usage_chunk(served, rid, object_kind, params, total))
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away (this task was cancelled)
        run.cancel()


# -------------------------------------------------------------------------------------------------
# The page's data
# -------------------------------------------------------------------------------------------------


def _page_data(engine: Engine, compute):
    """An endpoint whose work runs on the engine thread: compute(body) returns (fn, args)."""

    async def endpoint(request: Request):
        body = await read_json(request) if request.method == "POST" else {}
        fn, args = compute(body)
        result = await asyncio.wrap_future(engine.call(fn, *args))
        return JSONResponse(result)

    return endpoint


def _text(body: dict, name: str = "prompt") -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string", name)
    return value


def _model_info(served: Served):
    def info(model):
        summary = insides.model_summary(served.name, model, served.template.origin if served.template else None)
        return {**summary, "parameters": insides.parameters(model)}

    return info, (served.model,)


def _next(served: Served, body: dict):
    settings = api.sampling_settings(body)
    count = api.integer(body, "count", 20, 1, insides.MAX_BARS)
    return insides.next_tokens, (served.model, served.tokenizer, _text(body), settings, count)


def _attention(served: Served, body: dict):
    layer = api.integer(body, "layer", 0, 0, served.model.config.n_layer - 1)
    return insides.attention, (served.model, served.tokenizer, _text(body), layer)


def _lens(served: Served, body: dict):
    top = api.integer(body, "top", 3, 1, insides.MAX_LENS_TOP)
    return insides.logit_lens, (served.model, served.tokenizer, _text(body), top)


def _trace(served: Served, body: dict):
    cfg = served.model.config
    layer = api.integer(body, "layer", 0, 0, cfg.n_layer - 1)
    head = api.integer(body, "head", 0, 0, cfg.n_head - 1)
    top_k = api.integer(body, "top_k", 10, 1, 100)
    return insides.trace_prompt, (served.model, served.tokenizer, _text(body), layer, head, top_k)
