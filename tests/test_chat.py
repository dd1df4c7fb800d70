"""Chat templates (rendered as transformers renders them) and `tegaki chat` in the terminal."""

from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("jinja2", reason="the serve extra is not installed: pip install -e '.[serve]'")

from serve_models import write_model_folder

from tegaki.chat_template import (
    DEFAULT_TEMPLATE,
    ChatTemplate,
    find_chat_template,
    fit_to_context,
)
from tegaki.cli import main
from tegaki.errors import TegakiError
from tegaki.tokenizer import load

pytestmark = pytest.mark.usefixtures("one_thread")

# Templates in the styles found on the hub: ChatML with a default system message, Llama 2's with
# raise_exception on alternation, one with namespace, loop controls and tojson, and Gemma's.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama2": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    "namespace": (
        "{%- set ns = namespace(system='') -%}\n"
        "{%- for m in messages -%}\n"
        "  {%- if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- continue -%}{%- endif -%}\n"
        "  <{{ m.role }}>{{ m.content | tojson }}</{{ m.role }}>\n"
        "{%- endfor -%}\n"
        "{%- if ns.system %} [system: {{ ns.system }}]{% endif -%}\n"
        "{%- if add_generation_prompt %}<assistant>{% endif -%}"
    ),
    "gemma": (
        "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
        "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
        "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
}
CONVERSATION = [
    {"role": "system", "content": "日本語で答えてください。"},
    {"role": "user", "content": "こんにちは、<b>猫</b>は好き？"},
    {"role": "assistant", "content": "  はい、好きです。 "},
    {"role": "user", "content": "Why?"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("chat") / "tiny-ja")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_render_as_transformers_renders_them(tmp_path, folder, name):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    hf.chat_template = TEMPLATES[name]
    hf.save_pretrained(str(tmp_path))  # however this version of transformers writes the template
    template = find_chat_template([tmp_path], load(tmp_path))
    messages = CONVERSATION[1:] if name == "llama2" else CONVERSATION
    for add in (True, False):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert template.render(messages, add_generation_prompt=add) == expected


def test_a_template_refusing_messages_is_a_tegaki_error():
    template = ChatTemplate(TEMPLATES["llama2"], "test", {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(TegakiError, match="roles must alternate"):
        template.render([{"role": "assistant", "content": "hi"}])


def test_where_a_template_is_found(tmp_path, folder):
    tok = load(folder)
    assert find_chat_template([folder], tok).source == DEFAULT_TEMPLATE  # ChatML tokens, no template: the default
    own = tmp_path / "own"
    own.mkdir()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (own / "tokenizer_config.json").write_text(
        json.dumps(
            {**config, "chat_template": [{"name": "default", "template": "A"}, {"name": "rag", "template": "B"}]}
        )
    )
    assert find_chat_template([own], tok).source == "A"
    (own / "chat_template.jinja").write_text("C")
    assert find_chat_template([own], tok).source == "C"  # the file wins, as in transformers
    override = tmp_path / "mine.jinja"
    override.write_text("D")
    assert find_chat_template([own], tok, override).source == "D"
    with pytest.raises(TegakiError, match="no such file"):
        find_chat_template([own], tok, tmp_path / "missing.jinja")


def test_a_tegaki_run_without_chat_tokens_gets_the_plain_template(tmp_path):
    plain = write_model_folder(tmp_path / "plain", chatml=False, train_steps=0)
    tok = load(plain)
    assert find_chat_template([plain], tok) is None  # a transformers folder: no template, no guess
    template = find_chat_template([plain], tok, tegaki_run=True)
    text = template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "SYSTEM:\nBe brief.\n\nUSER:\nHi\n\nASSISTANT:\n"
    assert template.stop_strings == ["\n\n"] and template.stop_ids(tok) == {tok.eot_id}


def test_the_default_template_stops_at_im_end(folder):
    tok = load(folder)
    template = find_chat_template([folder], tok)
    assert template.stop_ids(tok) == {tok.special_tokens["<|im_end|>"]}
    text = template.render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_the_history_is_trimmed_oldest_first_keeping_the_system_message(folder):
    tok = load(folder)
    template = find_chat_template([folder], tok)
    messages = [{"role": "system", "content": "S"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 3} for i in range(8)
    ]
    ids, kept = fit_to_context(template, tok, messages, 100)
    assert len(ids) <= 100 and len(kept) < len(messages) and kept[0]["role"] == "system" and kept[-1] == messages[-1]
    assert kept[1:] == messages[len(messages) - len(kept) + 1 :]  # a tail of the conversation
    with pytest.raises(TegakiError, match="fit"):
        fit_to_context(template, tok, [{"role": "user", "content": "long " * 100}], 100)


# -------------------------------------------------------------------------------------------------
# tegaki chat
# -------------------------------------------------------------------------------------------------


def chat(monkeypatch, capsys, folder, lines: list[str], *flags: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", "--model", str(folder), "--temperature", "0", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_answers_resets_and_exits(monkeypatch, capsys, folder):
    code, out, _ = chat(monkeypatch, capsys, folder, ["こんにちは", "/reset", "こんにちは", "/exit", "never read"])
    assert code == 0
    assert out.count("model> 吾輩は猫である。\n") == 2  # the same answer after /reset: the history is gone
    assert "(history cleared)" in out
    assert "never read" not in out


def test_chat_keeps_the_history_within_the_context(monkeypatch, capsys, folder):
    lines = ["こんにちは " * 8] * 6  # each turn ~40 tokens with the reply; the context is 128
    code, out, _ = chat(monkeypatch, capsys, folder, lines, "--max-tokens", "16", "--system", "S")
    assert code == 0
    assert "no longer fit the context and were dropped" in out
    assert out.count("model> ") == 6


def test_chat_ends_at_end_of_input(monkeypatch, capsys, folder):
    code, out, _ = chat(monkeypatch, capsys, folder, [])
    assert code == 0 and "chatting with tiny-ja" in out


def test_chat_without_a_template_says_so(monkeypatch, capsys, tmp_path):
    plain = write_model_folder(tmp_path / "plain", chatml=False, train_steps=0)
    code, _, err = chat(monkeypatch, capsys, plain, ["hi"])
    assert code == 2 and "no chat template" in err and "--chat-template" in err


def test_without_jinja2_a_template_says_what_to_install(monkeypatch):
    """jinja2 comes with the serve extra: without it, rendering a template names the extra to install
    instead of raising a bare ImportError."""
    import sys

    from tegaki import chat_template

    monkeypatch.setattr(chat_template, "_environment_cache", None)
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 -> ImportError
    template = ChatTemplate("{{ messages[0]['content'] }} (never compiled before)", "test")
    with pytest.raises(TegakiError, match=r"pip install -e '\.\[serve\]'"):
        template.render([{"role": "user", "content": "hi"}])
