"""The OpenAI API's responses: whole answers, stream chunks and logprobs, as plain dicts.

`ChoiceText` collects one choice as its tokens arrive (its text cut at a stop string, its tokens,
how it ended); the functions below write what OpenAI's clients read. Checking a request is api.py's.
"""

from __future__ import annotations

import time
import uuid

from tegaki.generate import StopText
from tegaki.serve.api import Params
from tegaki.serve.engine import TokenEvent, token_piece
from tegaki.serve.served import Served

# -------------------------------------------------------------------------------------------------
# One choice's text as its tokens arrive
# -------------------------------------------------------------------------------------------------


class ChoiceText(StopText):
    """One choice: its text cut at the first stop string (`StopText`), its tokens and how it ended."""

    def __init__(self, stops: list[str]):
        super().__init__(stops)
        self.finish_reason: str | None = None
        self.tokens: list[TokenEvent] = []
        self.completion_tokens = 0


# -------------------------------------------------------------------------------------------------
# Writing responses
# -------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(tokenizer, events: list[TokenEvent], start_offset: int = 0) -> dict:
    """The legacy completions format: parallel lists, top_logprobs as {token text: logprob}."""
    offsets, offset = [], start_offset
    for e in events:
        offsets.append(offset)
        offset += len(e.text)
    return {
        "tokens": [token_piece(tokenizer, e.token_id) for e in events],
        "token_logprobs": [e.logprob for e in events],
        "top_logprobs": [{token_piece(tokenizer, i): lp for i, lp in e.top} for e in events],
        "text_offset": offsets,
    }


def _chat_token(tokenizer, token_id: int, logprob: float) -> dict:
    return {
        "token": token_piece(tokenizer, token_id),
        "logprob": logprob,
        "bytes": list(tokenizer.token_bytes(token_id)),
    }


def chat_logprobs(tokenizer, events: list[TokenEvent]) -> dict:
    """The chat format: one entry per token, its bytes, and its alternatives."""
    return {
        "content": [
            {
                **_chat_token(tokenizer, e.token_id, e.logprob),
                "top_logprobs": [_chat_token(tokenizer, i, lp) for i, lp in e.top],
            }
            for e in events
        ]
    }


def completion_response(served: Served, rid: str, choices: list[ChoiceText], params: Params) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": served.name,
        "choices": [
            {
                "index": i,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "logprobs": completion_logprobs(served.tokenizer, c.tokens) if params.logprobs is not None else None,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage(params.prompt_tokens, sum(c.completion_tokens for c in choices)),
    }


def chat_response(served: Served, rid: str, choices: list[ChoiceText], params: Params) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served.name,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": chat_logprobs(served.tokenizer, c.tokens) if params.logprobs is not None else None,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage(params.prompt_tokens, sum(c.completion_tokens for c in choices)),
    }


def completion_chunk(
    served: Served,
    rid: str,
    index: int,
    text: str,
    events: list[TokenEvent] | None,
    finish_reason: str | None = None,
    offset: int = 0,
) -> dict:
    logprobs = completion_logprobs(served.tokenizer, events, offset) if events is not None else None
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": served.name,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def chat_chunk(
    served: Served, rid: str, index: int, delta: dict, events: list[TokenEvent] | None, finish_reason: str | None = None
) -> dict:
    logprobs = chat_logprobs(served.tokenizer, events) if events is not None else None
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": served.name,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(served: Served, rid: str, kind: str, params: Params, completion_tokens: int) -> dict:
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": served.name,
        "choices": [],
        "usage": usage(params.prompt_tokens, completion_tokens),
    }


def models_list(served: Served) -> dict:
    return {
        "object": "list",
        "data": [
            {
                "id": served.name,
                "object": "model",
                "created": served.created,
                "owned_by": "tegaki",
                "max_model_len": served.context,
            },
        ],
    }
