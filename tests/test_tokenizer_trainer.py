"""The BPE trainer: hand-computable merges, the fast trainer equals the textbook loop, files."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tegaki.errors import TegakiError
from tegaki.tokenizer import load
from tegaki.tokenizer.trainer import count_chunks, train_bpe, train_bpe_naive

SMALL_CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox doesn't.\n"
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。\n"
    "何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。\n"
    "It's 2024: 12345 items, 678 left. 🤖🤖🤖 done!\n"
) * 3


def test_wikipedia_example_gives_the_hand_computed_merges():
    # aaabdaaabac: "aa" is most frequent (4, overlapping) → Z; then "Za" and "ab" tie at 2 and
    # the smaller ids win ("ab" = 97, 98) → Y; then "ZY" (2) → X: the text becomes X d X a c.
    tok = train_bpe("aaabdaaabac", 256 + 3, special_tokens=())
    a, b = ord("a"), ord("b")
    assert tok.merges == {(a, a): 256, (a, b): 257, (256, 257): 258}
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, a, ord("c")]
    assert tok.token_bytes(258) == b"aaab"


def test_overlapping_runs_are_counted_and_merged_left_to_right():
    # aaaaa → Z Z a (4 overlapping "aa"); then "ZZ" and "Za" tie at 1 and Za (256, 97) is smaller.
    tok = train_bpe("aaaaa", 256 + 2, special_tokens=())
    assert tok.merges == {(97, 97): 256, (256, 97): 257}
    assert tok.encode("aaaaa") == [256, 257]


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_fast_trainer_equals_the_textbook_loop(pattern):
    fast = train_bpe(SMALL_CORPUS, 256 + 150 + 1, pattern=pattern)
    naive = train_bpe_naive(SMALL_CORPUS, 256 + 150 + 1, pattern=pattern)
    assert fast.merges == naive.merges
    assert fast.special_tokens == naive.special_tokens == {"<|endoftext|>": 256 + 150}


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab c\nあい🤖")), max_size=80), st.integers(0, 30))
def test_fast_trainer_equals_the_textbook_loop_on_random_corpora(text, num_merges):
    fast = train_bpe(text, 256 + num_merges, special_tokens=())
    naive = train_bpe_naive(text, 256 + num_merges, special_tokens=())
    assert fast.merges == naive.merges


def test_special_tokens_are_cut_out_before_counting():
    counts = count_chunks(["ab<|endoftext|>cd"], "gpt2", ["<|endoftext|>"])
    assert counts == {"ab": 1, "cd": 1}
    tok = train_bpe("x<|endoftext|>y" * 50, 300)
    assert not any(b"<|" in tok.token_bytes(i) for i in range(256, tok.vocab_size - 1))
    assert tok.encode("x<|endoftext|>y") == [ord("x"), tok.eot_id, ord("y")]


def test_patterns_differ_where_they_should():
    assert count_chunks(["12345"], "gpt2") == {"12345": 1}
    assert count_chunks(["12345"], "gpt4") == {"123": 1, "45": 1}
    assert count_chunks(["HE'LL"], "gpt4")["'LL"] == 1


def test_trained_tokenizer_round_trips_and_compresses():
    tok = train_bpe(SMALL_CORPUS, 256 + 100 + 1)
    assert tok.vocab_size == 357
    ids = tok.encode(SMALL_CORPUS)
    assert tok.decode(ids) == SMALL_CORPUS
    assert len(ids) < len(SMALL_CORPUS.encode()) / 2  # it learned something from its own corpus


def test_training_stops_early_when_every_chunk_is_one_token():
    tok = train_bpe("ab ab cd", 1000)
    # chunks "ab", " ab", " cd": merges ab, " a"... until each chunk is a single token
    assert all(len(tok.encode(chunk)) == 1 for chunk in ["ab", " ab", " cd"])
    assert tok.vocab_size < 1000 and tok.eot_id == tok.vocab_size - 1


def test_save_and_load_give_the_same_ids(tmp_path):
    tok = train_bpe(SMALL_CORPUS, 256 + 120 + 1, pattern="gpt4", name="small")
    tok.save(tmp_path / "small")
    again = load(tmp_path / "small")
    assert again.name == "small" and again.pattern_name == "gpt4"
    rng = random.Random(0)
    for _ in range(20):
        text = "".join(rng.choice(SMALL_CORPUS) for _ in range(60))
        assert again.encode(text) == tok.encode(text)
    assert again.special_tokens == tok.special_tokens and again.vocab_size == tok.vocab_size


def test_vocab_smaller_than_the_byte_alphabet_is_refused():
    with pytest.raises(TegakiError, match="256 byte tokens \\+ 1 special"):
        train_bpe("abc", 256)


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_trained_tokenizer_is_byte_exact_with_tiktoken(pattern):
    """tiktoken running our vocabulary (rank = id) with its own copy of the pattern agrees with us."""
    tiktoken = pytest.importorskip("tiktoken")
    tiktoken_patterns = {  # as written in tiktoken_ext/openai_public.py (gpt2, cl100k_base)
        "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
        "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
    }
    tok = train_bpe(SMALL_CORPUS, 256 + 150 + 1, pattern=pattern)
    ranks = {tok.token_bytes(i): i for i in range(tok.vocab_size - 1)}
    reference = tiktoken.Encoding(
        f"small-{pattern}", pat_str=tiktoken_patterns[pattern], mergeable_ranks=ranks, special_tokens=tok.special_tokens
    )
    rng = random.Random(0)
    alphabet = SMALL_CORPUS + "  \n\n\t 1234567 HE'S 'll"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert tok.encode(text) == reference.encode(text, allowed_special="all"), repr(text)
