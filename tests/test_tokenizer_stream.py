"""Streaming decode: pieces never hold a half character, and they join to the one-shot decode."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tegaki.tokenizer import load
from tegaki.tokenizer.stream import StreamDecoder, incomplete_tail_length


class ByteTokens:
    """A stand-in tokenizer whose tokens are arbitrary byte strings, to test the decoder alone."""

    def __init__(self, pieces):
        self.pieces = pieces

    def token_bytes(self, i):
        return self.pieces[i]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=5), max_size=30))
def test_pieces_join_to_the_full_decode_even_for_invalid_bytes(pieces):
    tok = ByteTokens(pieces)
    decoder = StreamDecoder(tok)
    out = [decoder.push(i) for i in range(len(pieces))] + [decoder.flush()]
    assert "".join(out) == b"".join(pieces).decode("utf-8", errors="replace")


@settings(max_examples=300, deadline=None)
@given(st.text(), st.data())
def test_valid_text_cut_anywhere_streams_without_replacement_characters(text, data):
    raw = text.encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
    decoder = StreamDecoder(ByteTokens(pieces))
    out = [decoder.push(i) for i in range(len(pieces))]
    assert all("\ufffd" not in piece for piece in out if "\ufffd" not in text)
    assert "".join(out) + decoder.flush() == text


def test_incomplete_tail_length_cases():
    no = "の".encode()  # e3 81 ae
    assert incomplete_tail_length(b"abc") == 0
    assert incomplete_tail_length(no) == 0
    assert incomplete_tail_length(no[:1]) == 1
    assert incomplete_tail_length(b"x" + no[:2]) == 2
    assert incomplete_tail_length("🤖".encode()[:3]) == 3
    assert incomplete_tail_length(b"\x81\x81") == 0  # stray continuation bytes never complete
    assert incomplete_tail_length(b"\xed\xa0") == 0  # a surrogate: invalid, release at once
    assert incomplete_tail_length(b"\xe0\x80") == 0  # an overlong form: invalid


def test_gpt2_stream_from_a_live_generator():
    tok = load("gpt2")
    text = "日本語と絵文字🤖👍🏽、そしてEnglish."
    ids = tok.encode(text)

    def live():  # a generator, as a sampling loop would produce
        yield from ids

    pieces = list(tok.stream_decode(live()))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 1  # streaming really released text before the end
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # naive per-token decode breaks
