"""Chat templates: a list of messages -> the one prompt text a model was trained to continue.

Where a model's template comes from, first found wins:

  1. --chat-template: a jinja2 template file (as transformers writes them), or the name of one of
     tegaki's two below, "chatml" or "plain"
  2. the checkpoint's own: chat_template.jinja (transformers >= 4.43 writes this file), or
     "chat_template" in tokenizer_config.json (a string, or a list of named ones: "default" is used)
  3. tegaki's default, `DEFAULT_TEMPLATE` below (ChatML), for a tokenizer that has its two special
     tokens <|im_start|> and <|im_end|> (train one with
     `tegaki tokenizer train ... --special-tokens "<|endoftext|>" "<|im_start|>" "<|im_end|>"`)
  4. for a tegaki run folder without those tokens (runs/demo, trained on Shakespeare), `PLAIN_TEMPLATE`:
     the conversation written as a play, "USER:\n...\n\nASSISTANT:\n", the reply ending at a blank
     line (where a speech ends) or at the end-of-text token

Any other model with none of these has no chat format: `find_chat_template` returns None and the
server answers chat requests with a 400 that says so (plain completions still work).

The template is rendered as transformers' `apply_chat_template` renders it (tests compare the two on
the same templates): a sandboxed jinja2 environment with trim_blocks and lstrip_blocks, the loop
controls extension, `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text, and
the tokenizer's special tokens (bos_token, eos_token, ...) as variables.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tegaki.errors import TegakiError

# ChatML, as Qwen and many others use it. Each message is <|im_start|>ROLE\nTEXT<|im_end|>\n, and the
# reply begins after "<|im_start|>assistant\n"; the model ends it by producing <|im_end|>.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")

# A model trained on plain text knows no chat tokens; a play's layout is the nearest thing it has seen.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper + ':\n' + message['content'] + '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:\n' }}{% endif %}"
)

# The special-token variables transformers hands a template.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class ChatTemplate:
    """A template with what it needs to render and where the assistant's reply ends."""

    source: str  # the jinja2 text
    origin: str  # where it came from, for messages and the page
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token -> "<s>", ...
    stop_texts: list[str] = field(default_factory=list)  # special tokens that end a reply
    stop_strings: list[str] = field(default_factory=list)  # text that ends a reply (cut before it)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for these messages. A template's own complaint (e.g. "roles must
        alternate") or a message it cannot handle becomes a TegakiError that says so."""
        try:
            return _compile(self.source).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except TegakiError:
            raise
        except Exception as e:  # noqa: BLE001 - a template is a program; any failure is the request's
            raise TegakiError(f"the chat template ({self.origin}) could not render these messages: {e}") from None

    def stop_ids(self, tokenizer) -> set[int]:
        """The ids of the tokens that end a reply, as far as the tokenizer knows them."""
        specials = getattr(tokenizer, "special_tokens", {})
        return {specials[text] for text in self.stop_texts if text in specials}


def end_ids(tokenizer, template: ChatTemplate | None) -> frozenset[int]:
    """Tokens that end any text the model writes: the tokenizer's end of text, and the template's
    end of turn (<|im_end|>) when the model has a chat format. Where generate, chat and serve stop."""
    ids = set(template.stop_ids(tokenizer)) if template else set()
    if getattr(tokenizer, "eot_id", None) is not None:
        ids.add(tokenizer.eot_id)
    return frozenset(ids)


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    return _environment().from_string(source)


_environment_cache = None


def _environment():
    """The jinja2 environment transformers renders chat templates in (see this file's docstring).
    jinja2 is imported here, not at the top: it comes with the serve extra."""
    global _environment_cache
    if _environment_cache is not None:
        return _environment_cache
    try:
        import jinja2.ext
        from jinja2 import nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise TegakiError(
            f"chat templates need jinja2 ({e.name} is missing): pip install -e '.[serve]' in tegaki's clone"
        ) from None

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's part for transformers'
        training masks; in a prompt it renders its body unchanged."""

        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja2's own tojson escapes <, > and & for HTML; a prompt wants the text as it is.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    _environment_cache = env
    return env


# -------------------------------------------------------------------------------------------------
# Finding a model's template
# -------------------------------------------------------------------------------------------------


def local_template_folders(model_ref: str | Path) -> list[Path]:
    """Where a chat template may be for a model on disk: its folder, and a run folder's tokenizer/.
    Empty for anything else (a hub id: `load.ModelSource.template_folders` downloads its files)."""
    folder = Path(model_ref).expanduser()
    return [folder, folder / "tokenizer"] if folder.is_dir() else []


def find_chat_template(
    folders: list[Path], tokenizer, override: str | Path | None = None, tegaki_run: bool = False
) -> ChatTemplate | None:
    """The template for a model whose files are in `folders` (a run folder and its tokenizer/, a
    transformers folder), or None when it has none. See this file's docstring for the order;
    tegaki_run: the model is a tegaki run folder, which gets a default in any case."""
    config = _tokenizer_config(folders)
    specials = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES if _token_text(config.get(name))}
    if override in NAMED:
        return NAMED[override](specials)
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise TegakiError(
                f"--chat-template {override}: no such file (give a jinja2 template file, or {' or '.join(NAMED)})"
            )
        return _with_stops(ChatTemplate(_read_template(path), str(path), specials))
    for folder in folders:
        if (folder / "chat_template.jinja").is_file():
            source = _read_template(folder / "chat_template.jinja")
            return _with_stops(ChatTemplate(source, str(folder / "chat_template.jinja"), specials))
    source = _pick_named(config.get("chat_template"))
    if source:
        return _with_stops(ChatTemplate(source, "tokenizer_config.json", specials))
    if all(t in getattr(tokenizer, "special_tokens", {}) for t in DEFAULT_SPECIAL_TOKENS):
        return chatml(specials)
    if tegaki_run:
        return plain(specials)
    return None


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TegakiError(f"{path} is not UTF-8 text (byte {e.start}); save the chat template as UTF-8") from None
    except OSError as e:
        raise TegakiError(f"cannot read the chat template {path}: {e.strerror or e}") from None


def chatml(specials: dict[str, str]) -> ChatTemplate:
    return ChatTemplate(DEFAULT_TEMPLATE, "tegaki's default (ChatML)", specials, ["<|im_end|>"])


def plain(specials: dict[str, str]) -> ChatTemplate:
    return ChatTemplate(
        PLAIN_TEMPLATE, "tegaki's default for plain text (a play)", specials, ["<|endoftext|>"], ["\n\n"]
    )


NAMED = {"chatml": chatml, "plain": plain}  # --chat-template NAME


def _with_stops(template: ChatTemplate) -> ChatTemplate:
    """A reply ends at the end-of-sequence token, and at the end-of-turn markers common templates use."""
    stops = [template.special_tokens["eos_token"]] if "eos_token" in template.special_tokens else []
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|return|>"):
        if marker in template.source:
            stops.append(marker)
    template.stop_texts = stops
    return template


def _tokenizer_config(folders: list[Path]) -> dict:
    for folder in folders:
        path = folder / "tokenizer_config.json"
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; JSON nested too deep
                raise TegakiError(f"{path} is not valid JSON: {e}") from None
    return {}


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as its text or as {"content": text, ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick_named(value) -> str | None:
    """chat_template is a string, or a list of {"name", "template"}: transformers uses "default"."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


# -------------------------------------------------------------------------------------------------
# Keeping a conversation within the context
# -------------------------------------------------------------------------------------------------


def fit_to_context(template: ChatTemplate, tokenizer, messages: list[dict], limit: int) -> tuple[list[int], list[dict]]:
    """(prompt ids of at most `limit` tokens, the messages they hold). The oldest turns go first;
    system messages stay. A last message that alone is too long is a TegakiError."""
    messages = list(messages)
    while True:
        ids = tokenizer.encode(template.render(messages, add_generation_prompt=True))
        if len(ids) <= limit:
            return ids, messages
        oldest = next((i for i, m in enumerate(messages[:-1]) if m.get("role") != "system"), None)
        if oldest is None:
            raise TegakiError(
                f"the message is {len(ids)} tokens with the template; with room kept for the reply, at most {limit} fit"
            )
        del messages[oldest]
