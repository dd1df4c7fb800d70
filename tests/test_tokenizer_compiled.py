"""The compiled encoder (tiktoken running a tegaki vocabulary) and the readable loop: the same ids."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tegaki.tokenizer.bpe import BytePairTokenizer
from tegaki.tokenizer.compiled import tiktoken_agrees, tiktoken_encoding
from tegaki.tokenizer.trainer import train_bpe

pytest.importorskip("tiktoken")

JAPANESE = (
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。\n"
    "何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。\n"
    "「オプション」を指定しない場合は、標準入力から読み込む。ファイルが存在しなければエラーを返す。\n"
)
ENGLISH = "The quick brown fox jumps over the lazy dog. It's 2024: 12345 items!\n  indented\n\n"
CORPUS = (JAPANESE + ENGLISH) * 4
JA_ALPHABET = list("吾輩は猫である。名前まだ無いどこで生れたかとんと見当つかぬ「」、ー ァアカ\n123abc🤖")


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def tok(request):
    tok = train_bpe(CORPUS, 256 + 200 + 1, pattern=request.param, name=f"small-{request.param}")
    assert tok.compiled_encoder() is not None, "tiktoken should accept a vocabulary tegaki trained"
    return tok


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_compiled_equals_readable_on_any_unicode(tok, text):
    ids = tok.encode_ordinary(text)  # st.text() holds no lone surrogates, as encode_readable needs
    assert ids == tok.encode_readable(text)
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(JA_ALPHABET), max_size=120))
def test_compiled_equals_readable_on_japanese(tok, text):
    assert tok.encode_ordinary(text) == tok.encode_readable(text)


def test_compiled_equals_readable_on_long_text(tok):
    text = CORPUS * 3 + "の" * 500 + " " * 40 + "\n" * 7
    assert tok.encode_ordinary(text) == tok.encode_readable(text)


def test_a_token_that_is_not_its_own_encoding_keeps_the_readable_path():
    """ "abc" made from (a, bc) while "ab" is merged first: BPE on "abc" stops at [ab, c]; tiktoken
    would go on to "abc" (its bytes are a token). The check must refuse tiktoken here."""
    a, b, c = ord("a"), ord("b"), ord("c")
    vocab = {i: bytes([i]) for i in range(256)}
    vocab.update({256: b"ab", 257: b"bc", 258: b"abc"})
    merges = {(a, b): 256, (b, c): 257, (a, 257): 258}
    tok = BytePairTokenizer(vocab, merges, "gpt2", name="odd")
    assert tok.encode_readable("abc") == [256, c]
    import tiktoken

    ranks = {token: i for i, token in vocab.items()}
    reference = tiktoken.Encoding("odd", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens={})
    assert reference.encode("abc") == [258]
    assert not tiktoken_agrees(tok) and tiktoken_encoding(tok) is None
    assert tok.compiled_encoder() is None and tok.encode("abc") == [256, c]


def test_the_compiled_path_can_be_switched_off(tok):
    plain = BytePairTokenizer(tok.vocab, tok.merges, tok.pattern_name, tok.special_tokens)
    plain.use_compiled = False
    assert plain.compiled_encoder() is None
    assert plain.encode(CORPUS) == tok.encode(CORPUS)


def test_a_pickled_tokenizer_rebuilds_its_compiled_encoder(tok):
    import pickle

    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(JAPANESE) == tok.encode(JAPANESE)
    assert again.compiled_encoder() is not None
