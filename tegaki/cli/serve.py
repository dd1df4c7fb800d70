"""`tegaki serve --model M`: an OpenAI-compatible HTTP server and a page of the model's insides."""

from __future__ import annotations

from tegaki.cli.generate import DTYPES
from tegaki.errors import TegakiError
from tegaki.serve.engine import MAX_ACTIVE, Engine
from tegaki.serve.served import load_served

HOST, PORT = "127.0.0.1", 8000


def add_model_arguments(p) -> None:
    """The flags `tegaki serve` and `tegaki chat` share: which model, where, and its template."""
    p.add_argument("--model", required=True, help="a tegaki run folder, a transformers folder, or a hub id (gpt2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (default cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and activations (default fp32)")
    p.add_argument(
        "--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization of the linear layers"
    )
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
        "the logit lens. Needs the serve extra: pip install 'tegaki[serve]'.",
    )
    add_model_arguments(p)
    p.add_argument("--host", default=HOST, help=f"address to listen on (default {HOST}: this machine only)")
    p.add_argument("--port", type=int, default=PORT, help=f"(default {PORT})")
    p.add_argument("--name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument(
        "--max-active",
        type=int,
        default=MAX_ACTIVE,
        help=f"requests decoding at once; more wait their turn (default {MAX_ACTIVE})",
    )
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    try:  # the web stack is an optional extra: import it only when serving
        import uvicorn

        from tegaki.serve.app import create_app
    except ImportError as e:
        raise TegakiError(
            f"tegaki serve needs the serve extra ({e.name} is missing): pip install 'tegaki[serve]'"
        ) from None
    if not 0 <= args.port < 65536:
        raise TegakiError(f"--port must be in 0..65535, got {args.port}")
    served = load_served(
        args.model,
        name=args.name,
        device=args.device,
        dtype=DTYPES[args.dtype],
        quantize=args.quantize,
        chat_template=args.chat_template,
    )
    engine = Engine(served.model, served.tokenizer, max_active=args.max_active)
    chat = f"chat template: {served.template.origin}" if served.template else "no chat template: /v1/completions only"
    print(
        f"tegaki serve: {served.name} ({chat})\n  page: http://{args.host}:{args.port}/\n"
        f"  API:  http://{args.host}:{args.port}/v1",
        flush=True,
    )
    try:
        uvicorn.run(create_app(served, engine), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0
