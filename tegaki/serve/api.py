"""The OpenAI API's requests: checking a body and turning it into the engine's requests.

Plain dicts in; no web framework here (app.py does the HTTP, responses.py writes the answers).
Every mistake in a request raises `ApiError`, which app.py turns into the JSON error body OpenAI's
clients expect:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

What is honoured: model, prompt (completions) / messages (chat), max_tokens (chat also
max_completion_tokens), temperature, top_p, n, stop, seed, stream, stream_options.include_usage,
presence_penalty, logprobs (completions: an int; chat: a bool with top_logprobs), and, as vLLM
does, top_k, min_p and repetition_penalty. What tegaki does not do (echo, best_of > n, logit_bias,
frequency_penalty, tools) is refused with a 400 that names it, rather than silently ignored.

A seeded request with n > 1 seeds its choice i with seed + i, so each choice is reproducible alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from tegaki.errors import TegakiError
from tegaki.sampling import SamplingSettingError, SamplingSettings
from tegaki.serve.engine import GenerationRequest
from tegaki.serve.served import Served

MAX_N = 16  # choices per request
NORMALIZATION_SLACK = 4  # a tokenizer's normalization (NFKC) shrinks a text by at most about 3x
MAX_LOGPROBS = 20  # alternatives per token
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class ApiError(Exception):
    """A request the server will not serve, with the HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (each a `tegaki serve` flag)."""

    max_body_bytes: int = 4 * 2**20  # the JSON body
    max_prompt_tokens: int | None = None  # per prompt; None: the model's context
    max_sequences: int = 64  # prompts x n in one request


DEFAULT_LIMITS = Limits()  # frozen: safe to share


@dataclass
class Params:
    """A checked request: one GenerationRequest per choice, and how to answer."""

    requests: list[GenerationRequest]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    stop: list[str]
    logprobs: int | None  # None: no logprobs; else how many alternatives per token


# -------------------------------------------------------------------------------------------------
# Reading a request
# -------------------------------------------------------------------------------------------------


def _number(body: dict, name: str, default, low=None, high=None, integer=False):
    """body[name] as a number within [low, high], or default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"{name} must be {allowed}, got {value}", name)
    return value


def integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    """body[name] as an integer within [low, high] (the page's parameters)."""
    return _number(body, name, default, low, high, integer=True)


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}", name)
    return value


def _refuse_unsupported(body: dict) -> None:
    """Options that would change the answer but tegaki does not implement: say so, don't ignore them."""
    if body.get("echo"):
        raise ApiError(400, "echo is not supported by tegaki serve", "echo")
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported by tegaki serve", "logit_bias")
    if body.get("frequency_penalty") not in (None, 0, 0.0):
        raise ApiError(
            400, "frequency_penalty is not supported; use presence_penalty or repetition_penalty", "frequency_penalty"
        )
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise ApiError(400, "best_of is not supported (leave it out, or equal to n)", "best_of")
    if body.get("tools") or body.get("functions"):
        raise ApiError(400, "tool calling is not supported by tegaki serve", "tools")
    if body.get("suffix"):
        raise ApiError(400, "suffix (insertion) is not supported by tegaki serve", "suffix")


def check_model(body: dict, served: Served) -> None:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "you must provide a model parameter (see GET /v1/models)", "model")
    if name != served.name:
        raise ApiError(
            404, f"The model '{name}' does not exist; this server serves '{served.name}'", "model", "model_not_found"
        )


def sampling_settings(body: dict) -> SamplingSettings:
    """temperature, top_p, top_k, min_p and the penalties. Their ranges are SamplingSettings' own
    (one place for the server, `generate`, `chat` and `eval`); here only their JSON types."""
    keywords = {
        "temperature": _number(body, "temperature", 1.0),
        "top_p": _number(body, "top_p", None),
        "top_k": _number(body, "top_k", None, integer=True),
        "min_p": _number(body, "min_p", None),
        "repetition_penalty": _number(body, "repetition_penalty", 1.0),
        "presence_penalty": _number(body, "presence_penalty", 0.0),
    }
    if keywords["top_k"] in (-1, 0):  # vLLM's spelling of "no limit"
        keywords["top_k"] = None
    try:
        return SamplingSettings(**keywords)
    except SamplingSettingError as e:
        raise ApiError(400, str(e), e.name) from None


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", "stop")
    return [s for s in stops if s]


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    return bool(options.get("include_usage"))


def _max_tokens(body: dict, names: tuple[str, ...], default: int | None) -> int | None:
    for name in names:
        if body.get(name) is not None:
            return _number(body, name, None, 1, None, integer=True)
    return default


def _fit_context(served: Served, prompt: list[int], max_tokens: int | None, param: str) -> int:
    """The number of new tokens to ask for, or a 400 when the prompt and the reply do not fit."""
    if not prompt:
        raise ApiError(400, "the prompt is empty: give at least one token", param)
    if max_tokens is None:  # the rest of the context, which must leave room for one token
        if len(prompt) >= served.context:
            raise ApiError(
                400,
                f"This model's maximum context length is {served.context} tokens. However, your prompt has "
                f"{len(prompt)} tokens, which leaves no room for a reply. Please reduce the prompt.",
                param,
                "context_length_exceeded",
            )
        max_tokens = served.context - len(prompt)
    if len(prompt) + max_tokens > served.context:
        raise ApiError(
            400,
            f"This model's maximum context length is {served.context} tokens. However, you requested "
            f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max(max_tokens, 0)} for the "
            "completion). Please reduce the prompt or max_tokens.",
            param,
            "context_length_exceeded",
        )
    return max_tokens


def _choices(
    served: Served,
    limits: Limits,
    prompts: list[list[int]],
    body: dict,
    max_tokens: int | None,
    param: str,
    top_logprobs: int,
) -> list[GenerationRequest]:
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    seed = _number(body, "seed", None, 0, 2**63 - 1 - MAX_N, integer=True)
    sampling = sampling_settings(body)
    if len(prompts) * n > limits.max_sequences:
        raise ApiError(
            400,
            f"{len(prompts)} prompt(s) x n={n} asks for {len(prompts) * n} sequences; this server takes "
            f"{limits.max_sequences} per request (--max-request-sequences). Send fewer prompts or a smaller n.",
            "n",
            "too_many_sequences",
        )
    requests = []
    for prompt in prompts:
        if limits.max_prompt_tokens is not None and len(prompt) > limits.max_prompt_tokens:
            raise prompt_too_long(served, limits, f"has {len(prompt)} tokens", param)
        if any(not 0 <= t < served.model.config.vocab_size for t in prompt):
            raise ApiError(400, f"token ids must be in [0, {served.model.config.vocab_size})", param)
        new = _fit_context(served, prompt, max_tokens, param)
        for i in range(n):
            requests.append(
                GenerationRequest(
                    prompt,
                    new,
                    sampling,
                    None if seed is None else seed + i,
                    served.end_ids(),
                    top_logprobs,
                )
            )
    return requests


def prompt_too_long(served: Served, limits: Limits, what: str, param: str) -> ApiError:
    if limits.max_prompt_tokens is None:
        message = f"This model's maximum context length is {served.context} tokens. However, the prompt {what}."
        return ApiError(400, message + " Please reduce the prompt.", param, "context_length_exceeded")
    message = f"the prompt {what}; this server takes {limits.max_prompt_tokens} at most (--max-prompt-tokens)."
    return ApiError(400, message + " Please reduce the prompt.", param, "prompt_too_long")


def check_fits(served: Served, limits: Limits, text: str, param: str) -> None:
    """Refuse a text too long to fit before it is tokenized (a tokenizer holds the interpreter for a
    while on megabytes): each token stands for at most longest_token bytes, a character is at least
    one byte, and normalization shrinks a text by less than the slack."""
    limit = limits.max_prompt_tokens or served.context
    if len(text) > limit * served.longest_token * NORMALIZATION_SLACK:
        raise prompt_too_long(served, limits, f"is {len(text):,} characters, far more than {limit} tokens", param)


def encode_within(served: Served, limits: Limits, text: str, param: str) -> list[int]:
    """The text's ids, refused before tokenizing when it cannot fit (check_fits)."""
    check_fits(served, limits, text, param)
    return encode_prompt(served.tokenizer, text)


def _prompts(body: dict, served: Served, limits: Limits) -> list[list[int]]:
    """A completion's prompt: a string, a list of strings, a list of token ids, or a list of those."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "you must provide a prompt", "prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_N:
        raise ApiError(400, f"prompt must be a string, token ids, or a list of 1 to {MAX_N} of those", "prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(encode_within(served, limits, p, "prompt"))
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append(list(p))
        else:
            raise ApiError(400, "each prompt must be a string or a list of token ids", "prompt")
    return out


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Text -> ids; an empty text starts from the end-of-text token, as GPT models begin a document."""
    ids = tokenizer.encode(text)
    if not ids and getattr(tokenizer, "eot_id", None) is not None:
        ids = [tokenizer.eot_id]
    return ids


def completion_params(body: dict, served: Served, limits: Limits = DEFAULT_LIMITS) -> Params:
    check_model(body, served)
    _refuse_unsupported(body)
    stream = _flag(body, "stream")
    logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    prompts = _prompts(body, served, limits)
    max_tokens = _max_tokens(body, ("max_tokens",), COMPLETIONS_MAX_TOKENS)
    requests = _choices(served, limits, prompts, body, max_tokens, "prompt", logprobs or 0)
    return Params(requests, sum(len(p) for p in prompts), stream, _stream_options(body, stream), _stops(body), logprobs)


def chat_messages(body: dict) -> list[dict]:
    """The messages, checked, with text parts joined into one string as templates expect."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                raise ApiError(400, f"messages[{i}]: only text content is supported", f"messages[{i}].content")
            content = "".join(str(part.get("text", "")) for part in content)
        if content is not None and not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({**m, "content": content or ""})
    return out


def chat_prompt(body: dict, served: Served, limits: Limits = DEFAULT_LIMITS) -> list[int]:
    """The chat's prompt ids: the messages through the model's template."""
    if served.template is None:
        raise ApiError(
            400,
            f"the model '{served.name}' has no chat template (no chat_template in tokenizer_config.json or "
            "chat_template.jinja, and its tokenizer lacks <|im_start|>/<|im_end|> for tegaki's default). "
            "Use /v1/completions, or start the server with --chat-template FILE.",
            "messages",
            "no_chat_template",
        )
    try:
        text = served.template.render(chat_messages(body), add_generation_prompt=True)
    except TegakiError as e:
        raise ApiError(400, str(e), "messages") from None
    return encode_within(served, limits, text, "messages")


def chat_params(body: dict, served: Served, limits: Limits = DEFAULT_LIMITS) -> Params:
    check_model(body, served)
    _refuse_unsupported(body)
    stream = _flag(body, "stream")
    want_logprobs = _flag(body, "logprobs")
    top = _number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
    if top is not None and not want_logprobs:
        raise ApiError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError(400, 'response_format: only {"type": "text"} is supported', "response_format")
    prompt = chat_prompt(body, served, limits)
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), None)
    requests = _choices(served, limits, [prompt], body, max_tokens, "messages", top or 0)
    stops = _stops(body) + served.template.stop_strings  # the template's own end of a reply, if any
    return Params(
        requests, len(prompt), stream, _stream_options(body, stream), stops, (top or 0) if want_logprobs else None
    )
