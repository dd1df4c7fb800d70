"""`tegaki serve --model M`: an OpenAI-compatible HTTP server and a page of the model's insides."""

from __future__ import annotations

import os

from tegaki.cli.options import add_model_arguments
from tegaki.device import DTYPES, pick_device, pick_dtype
from tegaki.errors import TegakiError
from tegaki.serve.api import DEFAULT_LIMITS, Limits
from tegaki.serve.engine import MAX_ACTIVE, MAX_QUEUED, Engine
from tegaki.serve.served import load_served

HOST, PORT = "127.0.0.1", 8000
API_KEY_VARIABLE = "TEGAKI_API_KEY"


def add_chat_template_argument(p) -> None:
    """--chat-template: `tegaki serve` and `tegaki chat` talk through the model's template, or this one."""
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a jinja2 chat template to use instead of the model's own (see docs/serving.md)",
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server, with a page of the model's insides at /",
        description="Serve a model over HTTP: /v1/completions, /v1/chat/completions and /v1/models as "
        "OpenAI's API has them, and at / a page that shows the next-token probabilities, attention and "
        "the logit lens. Needs the serve extra: pip install -e '.[serve]' in a clone.",
    )
    add_model_arguments(p)
    add_chat_template_argument(p)
    p.add_argument("--host", default=HOST, help=f"address to listen on (default {HOST}: this machine only)")
    p.add_argument("--port", type=int, default=PORT, help=f"(default {PORT})")
    p.add_argument("--name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument(
        "--max-active",
        type=int,
        default=MAX_ACTIVE,
        help=f"requests decoding at once; more wait their turn (default {MAX_ACTIVE})",
    )
    add_limit_arguments(p)
    add_access_arguments(p)
    p.set_defaults(func=run_serve)


def add_limit_arguments(p) -> None:
    """How much the server takes at once and in one request."""
    limits = p.add_argument_group("limits (beyond them: 400, 413 or 429, see docs/serving.md)")
    limits.add_argument(
        "--max-queued",
        metavar="N",
        type=int,
        default=MAX_QUEUED,
        help=f"sequences decoding or waiting, all requests together; more get 429 (default {MAX_QUEUED})",
    )
    limits.add_argument(
        "--max-request-sequences",
        metavar="N",
        type=int,
        default=DEFAULT_LIMITS.max_sequences,
        help=f"prompts x n in one request (default {DEFAULT_LIMITS.max_sequences})",
    )
    limits.add_argument(
        "--max-prompt-tokens",
        metavar="N",
        type=int,
        default=DEFAULT_LIMITS.max_prompt_tokens,
        help="tokens in one prompt (default: the model's context)",
    )
    limits.add_argument(
        "--max-body-mb",
        metavar="MB",
        type=float,
        default=DEFAULT_LIMITS.max_body_bytes / 2**20,
        help=f"size of a request body in MiB; more gets 413 (default {DEFAULT_LIMITS.max_body_bytes / 2**20:g})",
    )


def add_access_arguments(p) -> None:
    """Who may call the server: a key, pages elsewhere, further host names."""
    access = p.add_argument_group("who may call it (see docs/serving.md)")
    access.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get(API_KEY_VARIABLE),
        help=f"ask every API request for 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE}, else no key)",
    )
    access.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a page elsewhere that may call the API (http://localhost:3000, or * for any); repeatable. "
        "By default only the page this server serves",
    )
    access.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a further host name clients may call this server by (a reverse proxy's); repeatable. "
        "By default: its IP addresses, localhost and --host",
    )


def run_serve(args) -> int:
    try:  # the web stack is an optional extra: import it only when serving
        import uvicorn

        from tegaki.serve.app import Access, create_app
    except ImportError as e:
        raise TegakiError(
            f"tegaki serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]' in tegaki's clone"
        ) from None
    if not 0 <= args.port < 65536:
        raise TegakiError(f"--port must be in 0..65535, got {args.port}")
    limits = serve_limits(args)
    access = Access(args.host, tuple(args.allow_host), tuple(args.allow_origin), args.api_key or None)
    served = load_served(
        args.model,
        name=args.name,
        device=args.device,
        dtype=DTYPES[pick_dtype(args.dtype, pick_device(args.device))],
        quantize=args.quantize,
        chat_template=args.chat_template,
    )
    engine = Engine(served.model, served.tokenizer, max_active=args.max_active, max_queued=args.max_queued)
    chat = f"chat template: {served.template.origin}" if served.template else "no chat template: /v1/completions only"
    print(
        f"tegaki serve: {served.name} ({chat})\n  page: http://{args.host}:{args.port}/\n"
        f"  API:  http://{args.host}:{args.port}/v1",
        flush=True,
    )
    try:
        uvicorn.run(create_app(served, engine, limits, access), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0


def serve_limits(args) -> Limits:
    """The limit flags, checked (before the model loads)."""
    for flag in ("max_queued", "max_request_sequences", "max_prompt_tokens", "max_body_mb"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise TegakiError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if args.max_request_sequences > args.max_queued:
        raise TegakiError(
            f"--max-request-sequences ({args.max_request_sequences}) cannot be more than --max-queued "
            f"({args.max_queued}): such a request could never be taken"
        )
    for origin in args.allow_origin:
        if origin != "*" and (not origin.startswith(("http://", "https://")) or origin.count("/") != 2):
            raise TegakiError(f"--allow-origin takes an origin such as http://localhost:3000 (no path), got {origin}")
    return Limits(int(args.max_body_mb * 2**20), args.max_prompt_tokens, args.max_request_sequences)
