"""`tegaki chat --model M`: talk to a model in the terminal, through its chat template.

The history is kept and sent again each turn; when it no longer fits the context (with room for the
reply: --max-tokens, or half the context if that is less), the oldest turns are dropped, and the chat
says so. /reset forgets everything, /exit leaves
(as does Ctrl-D). Ctrl-C during a reply stops the reply and keeps the chat.
"""

from __future__ import annotations

import sys

from tegaki.chat_template import fit_to_context
from tegaki.cli.generate import add_sampling_arguments, sampling_from
from tegaki.cli.options import add_model_arguments
from tegaki.cli.serve import add_chat_template_argument
from tegaki.device import DTYPES, pick_device, pick_dtype
from tegaki.errors import TegakiError
from tegaki.generate import StopText
from tegaki.sampling import SamplingSettings
from tegaki.serve.engine import DoneEvent, Engine, GenerationRequest
from tegaki.serve.served import Served, load_served

MAX_TOKENS = 256


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Chat with a model through its chat template, replies streamed. "
        "/reset clears the history, /exit (or Ctrl-D) leaves.",
    )
    add_model_arguments(p)
    add_chat_template_argument(p)
    p.add_argument("--system", default=None, help="a system message to start every conversation with")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help=f"longest reply in tokens (default {MAX_TOKENS})")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int, default=None, help="seed of the first reply (then seed + 1, ...)")
    p.set_defaults(func=run_chat)


def run_chat(args) -> int:
    settings = sampling_from(args)
    if args.max_tokens < 1:
        raise TegakiError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    served = load_served(
        args.model,
        device=args.device,
        dtype=DTYPES[pick_dtype(args.dtype, pick_device(args.device))],
        quantize=args.quantize,
        chat_template=args.chat_template,
    )
    if served.template is None:
        raise TegakiError(
            f"{args.model} has no chat template (no chat_template in tokenizer_config.json or chat_template.jinja, "
            "and its tokenizer lacks <|im_start|>/<|im_end|> for tegaki's default); give one with --chat-template FILE"
        )
    engine = Engine(served.model, served.tokenizer, max_active=1)
    try:
        Chat(served, engine, settings, args).loop()
    finally:
        engine.close()
    return 0


class Chat:
    """The conversation: read a line, answer it, keep the history within the context."""

    def __init__(self, served: Served, engine: Engine, settings: SamplingSettings, args):
        self.served, self.engine, self.settings = served, engine, settings
        self.max_tokens = args.max_tokens
        self.seed = args.seed
        self.start = [{"role": "system", "content": args.system}] if args.system else []
        self.history = list(self.start)

    def loop(self) -> None:
        print(
            f"chatting with {self.served.name} ({self.served.context} tokens of context, template: "
            f"{self.served.template.origin}). /reset clears the history, /exit leaves.",
            flush=True,
        )
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
            if line.strip() == "/exit":
                return
            if line.strip() == "/reset":
                self.history = list(self.start)
                print("(history cleared)", flush=True)
                continue
            if line.strip():
                self.answer(line)

    def answer(self, text: str) -> None:
        messages = self.history + [{"role": "user", "content": text}]
        # Keep room for the reply: --max-tokens, or half the context when that is less.
        limit = self.served.context - min(self.max_tokens, self.served.context // 2)
        try:
            ids, kept = fit_to_context(self.served.template, self.served.tokenizer, messages, limit)
        except TegakiError as e:
            print(f"(not sent: {e})", flush=True)
            return
        if len(kept) < len(messages):
            print(
                f"(the {len(messages) - len(kept)} oldest message(s) no longer fit the context and were dropped)",
                flush=True,
            )
        messages = kept
        reply = self.stream_reply(ids, min(self.max_tokens, self.served.context - len(ids)))
        self.history = messages + [{"role": "assistant", "content": reply}]

    def stream_reply(self, ids: list[int], max_tokens: int) -> str:
        request = GenerationRequest(ids, max_tokens, self.settings, self.seed, self.served.end_ids())
        if self.seed is not None:
            self.seed += 1  # the next reply differs, and the whole chat is reproducible
        reply = StopText(self.served.template.stop_strings)  # cuts at the template's end of a reply
        out = sys.stdout
        out.write("model> ")
        events = self.engine.stream(request)
        try:
            for event in events:
                out.write(reply.add(event.text, final=isinstance(event, DoneEvent)))
                out.flush()
                if isinstance(event, DoneEvent) and event.reason == "error":
                    out.write(f"\n(the reply failed: {event.message})")
                if reply.stopped:
                    break
        except KeyboardInterrupt:
            out.write(reply.add("", final=True) + " (stopped)")
        finally:
            events.close()  # cancels the request if it is still going
        out.write("\n")
        out.flush()
        return reply.text
