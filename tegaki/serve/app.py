"""The ASGI app: OpenAI's endpoints, the page and its data, and errors as OpenAI-shaped JSON.

    GET  /health                  {"status": "ok", ...}: the model, requests under way, counters
    GET  /v1/models               the one model served
    POST /v1/completions          text in, text out (streamed as server-sent events with stream=true)
    POST /v1/chat/completions     messages through the chat template (tegaki/chat_template.py)
    GET  /                        the page (static/index.html) and its files under /static/
    GET  /api/model               the page's header: config, chat template, parameter table
    POST /api/next                next-token bars for a text under given sampling settings
    POST /api/attention           every head of one layer
    POST /api/lens                the logit lens
    POST /api/trace               `tegaki trace --json`

Streams end with `data: [DONE]`. A client that goes away cancels its requests, streamed or not:
Starlette cancels a stream's task, a whole answer watches for the hang-up beside its events
(`_collect`), and either way the `finally` tells the engine, which drops them at their next turn.
Nothing here touches the model directly: generation goes through the engine, the page's analysis
through `Engine.call`, so both run on the engine's one thread. A request body is read within
`Limits.max_body_bytes` and turned into token ids on a worker thread, so a huge prompt never stalls
the event loop (`/health` answers throughout).

Safe to leave running on a laptop (`Guard`, before any route): a request must name this server in
its Host header (a page on another site that rebinds its own name to 127.0.0.1 is refused), come
from this server's own page or an origin given with --allow-origin, send its body as JSON (a form or
text/plain, which any page may send without asking, is refused), and, with --api-key, carry OpenAI's
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tegaki.errors import TegakiError
from tegaki.serve import api, insides, responses
from tegaki.serve.api import ApiError, Limits, Params, Served
from tegaki.serve.engine import DoneEvent, Engine, EngineFull, TokenEvent

STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = 1  # a full engine frees places every token: ask again in a second
PUBLIC_PATHS = ("/", "/health")  # and /static/...: the page and its files, open without a key


@dataclass(frozen=True)
class Access:
    """Who may call the server (each a `tegaki serve` flag)."""

    host: str = "127.0.0.1"  # the address it listens on: a name there is one of its host names
    allow_hosts: tuple[str, ...] = ()  # further names a client may call it by (a reverse proxy's)
    allow_origins: tuple[str, ...] = ()  # pages elsewhere that may call it ("*": any)
    api_key: str | None = None  # None: no key asked


def create_app(
    served: Served, engine: Engine, limits: Limits = api.DEFAULT_LIMITS, access: Access = Access()
) -> Starlette:
    """The app for one served model; the caller owns the engine (and closes it)."""
    routes = [
        Route("/health", lambda r: _health(served, engine), methods=["GET"]),
        Route("/v1/models", lambda r: JSONResponse(responses.models_list(served)), methods=["GET"]),
        Route("/v1/completions", _endpoint(served, engine, limits, "completion"), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(served, engine, limits, "chat"), methods=["POST"]),
        Route("/", lambda r: FileResponse(STATIC / "index.html"), methods=["GET"]),
        Route("/api/model", _page_data(engine, limits, lambda body: _model_info(served)), methods=["GET"]),
        Route("/api/next", _page_data(engine, limits, lambda body: _next(served, body)), methods=["POST"]),
        Route("/api/attention", _page_data(engine, limits, lambda body: _attention(served, body)), methods=["POST"]),
        Route("/api/lens", _page_data(engine, limits, lambda body: _lens(served, body)), methods=["POST"]),
        Route("/api/trace", _page_data(engine, limits, lambda body: _trace(served, body)), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {ApiError: _api_error, TegakiError: _tegaki_error, HTTPException: _http_error, Exception: _crash}
    middleware = [Middleware(Guard, access=access, max_body_bytes=limits.max_body_bytes)]
    return Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)


# -------------------------------------------------------------------------------------------------
# The guard: host names, origins, content type, body size and the key, before any route
# -------------------------------------------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "localhost.")


def host_name(host_header: str) -> str:
    """ "127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1", "Example.COM" -> "example.com"."""
    return (urlsplit("//" + host_header).hostname or "").lower()


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """ASGI middleware: refuses, in OpenAI's error shape, what a page on another site could send.

    Host: an IP address (DNS rebinding needs a name), localhost, the address it listens on, or an
    --allow-host name. Origin (sent by browsers): absent, this server's own (scheme://Host), or an
    --allow-origin one; those get CORS headers and their preflight answered. POST bodies: JSON only
    (415), within max_body_bytes by Content-Length (413; a chunked body is counted as it is read).
    With an API key: `Authorization: Bearer KEY` on everything but the page, its files and /health.
    """

    def __init__(self, app, access: Access, max_body_bytes: int):
        self.app, self.access, self.max_body_bytes = app, access, max_body_bytes
        self.hosts = {*LOOPBACK_NAMES, access.host.lower(), *(h.lower() for h in access.allow_hosts)}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        try:
            self._check_host(headers.get("host", ""))
            cross = self._check_origin(origin, headers.get("host", ""))
            if cross and scope["method"] == "OPTIONS":  # a preflight from a page given with --allow-origin
                return await self._preflight(origin, scope, receive, send)
            self._check_key(scope["path"], headers.get("authorization"))
            if scope["method"] == "POST":
                self._check_body(headers)
        except ApiError as e:
            extra = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
            return await JSONResponse(e.body(), status_code=e.status, headers=extra)(scope, receive, send)
        if not cross:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                response_headers["Access-Control-Allow-Origin"] = origin
                response_headers.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _check_host(self, host_header: str) -> None:
        name = host_name(host_header)
        if not (name in self.hosts or is_ip_address(name)):
            raise ApiError(
                400,
                f"the Host header {host_header!r} is not a name of this server: call it by its address, "
                "localhost, or a name given with --allow-host",
                code="invalid_host",
            )

    def _check_origin(self, origin: str | None, host_header: str) -> bool:
        """Whether the request comes from a page of another origin that is allowed; refuse the rest."""
        if origin is None:  # not a browser's cross-site request: curl, the openai client, a same-origin GET
            return False
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.netloc.lower() == host_header.lower():
            return False  # the page this server serves
        if origin in self.access.allow_origins or "*" in self.access.allow_origins:
            return True
        raise ApiError(
            403,
            f"requests from pages at {origin} are refused: this server answers its own page; start it with "
            "--allow-origin ORIGIN to let another page call it",
            code="origin_not_allowed",
        )

    def _check_key(self, path: str, authorization: str | None) -> None:
        key = self.access.api_key
        if key is None or path in PUBLIC_PATHS or path.startswith("/static/"):
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "this server needs an API key: send the header 'Authorization: Bearer KEY' "
                "(the key it was started with, --api-key)",
                code="invalid_api_key",
            )

    def _check_body(self, headers: Headers) -> None:
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(
                415, f"the request body must be JSON (Content-Type: application/json), got {media_type or 'none'}"
            )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise body_too_large(self.max_body_bytes)

    async def _preflight(self, origin: str, scope, receive, send) -> None:
        headers = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        }
        await Response(status_code=204, headers=headers)(scope, receive, send)


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over {limit:,} bytes, this server's limit (--max-body-mb)")


# -------------------------------------------------------------------------------------------------
# Errors: always JSON in OpenAI's shape, never a traceback
# -------------------------------------------------------------------------------------------------


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


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


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) once it passes limit bytes, whatever its Content-Length said."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client went away before sending the whole body") from None
    return b"".join(chunks)


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object; any fault in it is a 400 (on a worker thread: a big body takes time)."""
    try:
        body = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except ValueError:  # Python's own limit on an integer's digits (4,300), against slow conversions
        raise ApiError(400, "the request body holds a number too long to read (over 4,300 digits)") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to read") from None
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
            "queued": engine.queued,
            **engine.stats,
        }
    )


# -------------------------------------------------------------------------------------------------
# Generation
# -------------------------------------------------------------------------------------------------


def _endpoint(served: Served, engine: Engine, limits: Limits, kind: str):
    check = api.completion_params if kind == "completion" else api.chat_params

    def params_of(raw: bytes) -> Params:  # parsing, the chat template and tokenizing: on a worker thread
        return check(parse_json(raw), served, limits)

    async def endpoint(request: Request):
        params = await run_in_threadpool(params_of, await read_body(request, limits.max_body_bytes))
        # Submitted before the answer starts: a request the engine refuses is a 400, not a broken stream.
        submission = Submission(engine, params)
        if params.stream:
            return StreamingResponse(_stream(served, submission, params, kind), media_type="text/event-stream")
        answer = await _collect(served, submission, params, kind, request)
        return JSONResponse(answer) if answer is not None else Response(status_code=499)  # 499: nobody reads it

    return endpoint


class Submission:
    """The engine requests of one API request (one per choice), their events on this event loop."""

    def __init__(self, engine: Engine, params: Params):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        try:
            self.jobs = engine.submit_all([(request, self._sink(loop, i)) for i, request in enumerate(params.requests)])
        except EngineFull as e:
            raise ApiError(429, str(e), code="server_busy", kind="server_busy") from None
        except TegakiError as e:
            raise ApiError(400, str(e)) from None
        self.choices = [responses.ChoiceText(params.stop) for _ in params.requests]
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


async def _hang_up(request: Request) -> None:
    """Returns when the client has gone (the body is read: what the server receives now is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(served: Served, submission: Submission, params: Params, kind: str, request: Request) -> dict | None:
    """A whole (not streamed) answer, or None when the client hangs up first, which stops the work."""
    gone = asyncio.ensure_future(_hang_up(request))
    try:
        while submission.open:
            event_ready = asyncio.ensure_future(submission.next())
            await asyncio.wait((event_ready, gone), return_when=asyncio.FIRST_COMPLETED)
            if not event_ready.done():  # the client went away: nobody will read the answer
                event_ready.cancel()
                return None
            i, event = event_ready.result()
            submission.choices[i].add(event.text, final=isinstance(event, DoneEvent))
            if submission.choices[i].stopped:
                submission.jobs[i].cancel()
    finally:
        gone.cancel()
        submission.cancel()
    respond = responses.completion_response if kind == "completion" else responses.chat_response
    return respond(served, responses.new_id("cmpl" if kind == "completion" else "chatcmpl"), submission.choices, params)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(served: Served, submission: Submission, params: Params, kind: str):
    """Server-sent events: one chunk per piece of text (per token when logprobs are asked for)."""
    rid = responses.new_id("cmpl" if kind == "completion" else "chatcmpl")
    offsets = [0] * len(submission.choices)

    def chunk(i: int, text: str, events, finish=None) -> str:
        if kind == "completion":
            c = responses.completion_chunk(served, rid, i, text, events, finish, offsets[i])
        else:
            delta = {"content": text} if text or finish is None else {}
            c = responses.chat_chunk(served, rid, i, delta, events, finish)
        offsets[i] += len(text)
        return _sse(c)

    try:
        if kind == "chat":  # OpenAI's first chunk of each choice carries the role
            for i in range(len(submission.choices)):
                yield _sse(responses.chat_chunk(served, rid, i, {"role": "assistant", "content": ""}, None))
        while submission.open:
            try:
                i, event = await submission.next()
            except ApiError as e:
                yield _sse(e.body())
                break
            choice = submission.choices[i]
            text = choice.add(event.text, final=isinstance(event, DoneEvent))
            with_logprobs = params.logprobs is not None and isinstance(event, TokenEvent)
            if isinstance(event, DoneEvent):
                yield chunk(i, text, [] if params.logprobs is not None else None, choice.finish_reason)
            elif text or with_logprobs:
                yield chunk(i, text, [event] if with_logprobs else None)
            if choice.stopped:
                submission.jobs[i].cancel()
        if params.include_usage:
            total = sum(c.completion_tokens for c in submission.choices)
            object_kind = "text_completion" if kind == "completion" else "chat.completion.chunk"
            yield _sse(responses.usage_chunk(served, rid, object_kind, params, total))
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away (this task was cancelled)
        submission.cancel()


# -------------------------------------------------------------------------------------------------
# The page's data
# -------------------------------------------------------------------------------------------------


def _page_data(engine: Engine, limits: Limits, compute):
    """An endpoint whose work runs on the engine thread: compute(body) returns (fn, args)."""

    async def endpoint(request: Request):
        raw = await read_body(request, limits.max_body_bytes) if request.method == "POST" else b"{}"
        fn, args = await run_in_threadpool(lambda: compute(parse_json(raw)))
        result = await asyncio.wrap_future(engine.call(fn, *args))
        return JSONResponse(result)

    return endpoint


def _text(served: Served, body: dict, name: str = "prompt") -> str:
    """The page's text: a string that can fit the context (the engine thread tokenizes it)."""
    value = body.get(name)
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string", name)
    api.check_fits(served, api.DEFAULT_LIMITS, value, name)
    return value


def _model_info(served: Served):
    def info(model):
        summary = insides.model_summary(served.name, model, served.template.origin if served.template else None)
        return {**summary, "parameters": insides.parameters(model)}

    return info, (served.model,)


def _next(served: Served, body: dict):
    settings = api.sampling_settings(body)
    count = api.integer(body, "count", 20, 1, insides.MAX_BARS)
    return insides.next_tokens, (served.model, served.tokenizer, _text(served, body), settings, count)


def _attention(served: Served, body: dict):
    layer = api.integer(body, "layer", 0, 0, served.model.config.n_layer - 1)
    return insides.attention, (served.model, served.tokenizer, _text(served, body), layer)


def _lens(served: Served, body: dict):
    top = api.integer(body, "top", 3, 1, insides.MAX_LENS_TOP)
    return insides.logit_lens, (served.model, served.tokenizer, _text(served, body), top)


def _trace(served: Served, body: dict):
    cfg = served.model.config
    layer = api.integer(body, "layer", 0, 0, cfg.n_layer - 1)
    head = api.integer(body, "head", 0, 0, cfg.n_head - 1)
    top_k = api.integer(body, "top_k", 10, 1, 100)
    return insides.trace_prompt, (served.model, served.tokenizer, _text(served, body), layer, head, top_k)
