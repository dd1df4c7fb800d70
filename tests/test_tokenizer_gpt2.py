"""GPT-2's tokenizer, checked byte for byte against tiktoken built from the same two files.

`encode` may itself run through tiktoken (tegaki.tokenizer.compiled), so the readable loop,
`encode_readable`, is checked against the reference on its own as well."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tegaki.errors import TegakiError
from tegaki.tokenizer import gpt2_files_dir, load
from tegaki.tokenizer.base import valid_unicode
from tegaki.tokenizer.bpe import PATTERNS, bytes_to_unicode

tiktoken = pytest.importorskip("tiktoken")
import tiktoken.load  # noqa: E402, F811 - the submodule, after the skip


@pytest.fixture(scope="module")
def gpt2():
    return load("gpt2")


@pytest.fixture(scope="module")
def reference():
    folder = gpt2_files_dir()
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json"))
    return tiktoken.Encoding(
        "gpt2", pat_str=PATTERNS["gpt2"], mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


FIXED = [
    "Hello, I am",
    "",
    " ",
    "   leading and trailing spaces   ",
    "I'm sure it's what they'd've said, y'all. DON'T SHOUT'S",
    "tabs\tand\nnewlines\r\n\n\n   \n",
    "3.14159 1,000,000 0x7f 12345678901234567890",
    "日本語のテキストを、バイト単位で分割します。",
    "ｶﾀｶﾅ 半角 ＦＵＬＬ　ＷＩＤＴＨ",
    "emoji 🤖👍🏽 👨‍👩‍👧‍👦 flags 🇯🇵",
    "combining: e\u0301 a\u0308 \u0915\u094d\u0937",
    "mixed 漢字and English123の間",
    "<|endoftext|> in text<|endoftext|>",
    "a" * 300 + " " + "の" * 200,
    "\x00\x01\x7f\u00ad\ufeff",
]


def test_hello_gives_the_well_known_ids(gpt2):
    assert gpt2.encode("Hello, I am") == [15496, 11, 314, 716]
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}


@pytest.mark.parametrize("text", FIXED)
def test_fixed_cases_match_tiktoken(gpt2, reference, text):
    assert gpt2.encode(text) == reference.encode(text, allowed_special="all")
    assert gpt2.encode_readable(text) == reference.encode_ordinary(text)
    assert gpt2.encode_ordinary(text) == reference.encode_ordinary(text)
    assert gpt2.decode(gpt2.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_matches_tiktoken(gpt2, reference, text):
    ids = gpt2.encode(text)
    assert ids == reference.encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text
    assert gpt2.encode_readable(text) == reference.encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(" \n'sdtlmve1234aZあの日本🤖é\u0301")), max_size=40))
def test_tricky_alphabet_matches_tiktoken(gpt2, reference, text):
    """A small alphabet of the characters the regex treats specially finds edge cases fast."""
    assert gpt2.encode(text) == reference.encode(text, allowed_special="all")
    assert gpt2.encode_readable(text) == reference.encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60))
def test_heap_merge_equals_readable_merge(gpt2, chunk):
    """The O(n log n) merge used for long chunks is the readable loop's twin."""
    assert gpt2.encode_chunk_fast(chunk) == gpt2.encode_chunk(chunk)


def test_heap_merge_on_a_long_japanese_chunk(gpt2, reference):
    text = "日本語のテキストをバイト単位で分割します" * 20  # one \p{L}+ chunk of 1,200 bytes
    chunk = text.encode()
    assert gpt2.encode_chunk_fast(chunk) == gpt2.encode_chunk(chunk)
    assert gpt2.encode(text) == gpt2.encode_readable(text) == reference.encode(text)


@pytest.mark.parametrize("text", ["a\ud800b", "x\udc80\ud83d", "\ud83d\ude00 joined pair"])
def test_lone_surrogates_become_replacement_characters_as_in_tiktoken(gpt2, reference, text):
    assert gpt2.encode(text) == reference.encode(text)
    assert gpt2.encode_readable(valid_unicode(text)) == reference.encode(text)
    assert gpt2.encode_ordinary(text) == reference.encode_ordinary(text)
    assert gpt2.decode(gpt2.encode(text)) == text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def test_special_token_policy(gpt2):
    text = "a<|endoftext|>b"
    assert gpt2.encode(text) == [64, 50256, 65]
    as_text = gpt2.encode(text, allowed_special="none")
    assert 50256 not in as_text and gpt2.decode(as_text) == text
    assert gpt2.encode(text, allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    assert gpt2.encode(text, allowed_special="<|endoftext|>") == [64, 50256, 65]
    with pytest.raises(TegakiError, match="unknown special"):
        gpt2.encode(text, allowed_special={"<|im_start|>"})


def test_decode_replaces_half_characters(gpt2):
    ids = gpt2.encode("語")  # e8 aa 9e: two tokens in GPT-2, e8 aa + 9e
    assert len(ids) == 2
    assert gpt2.decode_bytes(ids[:1]) + gpt2.decode_bytes(ids[1:]) == "語".encode()
    assert gpt2.decode(ids[:1]) == "\ufffd" and gpt2.decode(ids) == "語"


def test_decode_rejects_unknown_ids(gpt2):
    with pytest.raises(TegakiError, match="outside the vocabulary"):
        gpt2.decode([50257])


def test_byte_table_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_save_and_load_give_the_same_ids(gpt2, tmp_path):
    gpt2.save(tmp_path / "copy")
    again = load(tmp_path / "copy")
    for text in FIXED:
        assert again.encode(text) == gpt2.encode(text)
    assert again.special_tokens == gpt2.special_tokens


@pytest.mark.parametrize("names", [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")])
def test_a_bare_gpt2_folder_loads(tmp_path, names):
    """GPT-2's two files, under OpenAI's names or transformers' names."""
    for source, target in zip(("encoder.json", "vocab.bpe"), names):
        (tmp_path / target).write_bytes((gpt2_files_dir() / source).read_bytes())
    tok = load(tmp_path)
    assert tok.encode("Hello, I am<|endoftext|>") == [15496, 11, 314, 716, 50256]


def test_unknown_name_and_missing_folder(tmp_path):
    with pytest.raises(TegakiError, match="known names: gpt2"):
        load("gpt-7")
    with pytest.raises(TegakiError, match="holds no tokenizer"):
        load(tmp_path)
