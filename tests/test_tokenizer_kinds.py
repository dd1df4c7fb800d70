"""Every kind behind the one interface: round trips, streaming, save → load, special tokens."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tegaki.tokenizer import load
from tegaki.tokenizer.trainer import train_bpe

JAPANESE = (
    "トークナイザは文章を数字の列に変えます。バイト単位のBPEは、日本語の一文字を二つや三つの"
    "トークンに分けることがあります。その途中で文字を表示すると、置換文字（�ではなく）が出てしまう"
    "ので、ストリーミングでは文字が揃うまで待ちます。漢字、ひらがな、カタカナ、そして英語が混ざった"
    "文章でも、同じ規則で動きます。\n"
)
ENGLISH = (
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n"
)
CORPUS = (JAPANESE + ENGLISH) * 20
STREAM_TEXT = "日本語のテキスト🤖と絵文字👨‍👩‍👧、そして English 😀 text。\n改行も。"

KINDS = ["gpt2", "bpe", "unigram", "sp-bpe"]


@pytest.fixture(scope="module", params=KINDS)
def tok(request):
    kind = request.param
    if kind == "gpt2":
        return load("gpt2")
    if kind == "bpe":
        return train_bpe(CORPUS, 256 + 300 + 1, pattern="gpt4", name="small-bpe")
    pytest.importorskip("sentencepiece")
    from tegaki.tokenizer.spm import train_sentencepiece

    model_type = "unigram" if kind == "unigram" else "bpe"
    return train_sentencepiece(CORPUS, 500, model_type=model_type, name=f"small-{kind}")


@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_round_trip_on_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allowed_special="none")) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "  two  spaces  ",
        "\n\n\t\r\n",
        "▁ a literal U+2581 ▁▁",
        "ｶﾀｶﾅ　全角スペース",
        "e\u0301 combining",
        "\x00nul",
        "<|endoftext|>",
        "x<|endoftext|><|endoftext|>y",
        "𠮷野家 (a character outside the BMP)",
        STREAM_TEXT,
    ],
)
def test_round_trip_fixed_cases(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(text=st.text(alphabet=st.characters(codec=None), max_size=20))
def test_text_with_lone_surrogates_encodes_as_replacement_characters(tok, text):
    """Not valid Unicode, so no bytes spell it: each lone surrogate comes back as U+FFFD."""
    expected = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert tok.decode(tok.encode(text)) == expected


def test_stream_decode_has_no_replacement_characters(tok):
    ids = tok.encode(STREAM_TEXT)
    pieces = list(tok.stream_decode(iter(ids)))
    assert "".join(pieces) == STREAM_TEXT == tok.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)

    decoder = tok.stream_decoder()  # the token-by-token form a generation loop uses
    out = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert out == STREAM_TEXT


def test_special_tokens_and_eot(tok):
    assert tok.eot_id is not None and tok.special_tokens["<|endoftext|>"] == tok.eot_id
    ids = tok.encode("a<|endoftext|>b")
    assert ids.count(tok.eot_id) == 1
    assert tok.eot_id not in tok.encode("a<|endoftext|>b", allowed_special="none")
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_save_then_load_gives_the_same_ids(tok, tmp_path):
    tok.save(tmp_path / "saved")
    again = load(tmp_path / "saved")
    assert type(again) is type(tok)
    assert again.vocab_size == tok.vocab_size and again.special_tokens == tok.special_tokens
    for text in [CORPUS[:500], STREAM_TEXT, "▁x <|endoftext|> y"]:
        assert again.encode(text) == tok.encode(text)


def test_every_byte_has_a_token(tok):
    """What makes "no unknown token" true: each of the 256 bytes can be spelled on its own."""
    spelled = {tok.token_bytes(i) for i in range(tok.vocab_size)}
    assert all(bytes([b]) in spelled for b in range(256))


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(codec=None, blacklist_characters="\ufffd"), max_size=40))
def test_streaming_any_text_gives_whole_characters_only(tok, text):
    """Token by token, for any text (NUL bytes, emoji, lone surrogates): no U+FFFD is ever printed
    mid-stream (a lone surrogate can only come back as U+FFFD, in the piece that holds it), and the
    pieces join to exactly what one-shot decoding gives."""
    expected = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    pieces = list(tok.stream_decode(iter(tok.encode(text))))
    assert "".join(pieces) == expected == tok.decode(tok.encode(text))
    assert sum(piece.count("\ufffd") for piece in pieces) == expected.count("\ufffd")


@pytest.mark.parametrize("text", ["\x00", "a\x00b\x00\x00", "\x00日本\x00語", "\ud800", "x\udfff\x00y"])
def test_nul_bytes_and_surrogates_stream_and_round_trip(tok, text):
    expected = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    ids = tok.encode(text)
    assert tok.decode(ids) == expected == "".join(tok.stream_decode(ids))
