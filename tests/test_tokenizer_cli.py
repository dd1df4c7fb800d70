"""The `tegaki tokenizer` command: train → load, stats, show, and clear errors for bad input."""

import io

import pytest

from tegaki.cli import main
from tegaki.cli.tokenizer import cut_range, printable_piece, read_inputs, use_colour
from tegaki.data import shakespeare_text
from tegaki.tokenizer import load
from tegaki.tokenizer.stats import token_stats
from tegaki.tokenizer.trainer import train_bpe, train_bpe_tokenizers

TEXT = (
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。\n"
    "The cat has no name yet; it doesn't know where it was born.\n"
) * 40


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["bpe", "unigram", "sp-bpe"])
def test_train_writes_a_folder_that_load_reads(corpus, tmp_path, capsys, kind):
    if kind != "bpe":
        pytest.importorskip("sentencepiece")
    out = tmp_path / f"tok-{kind}"
    assert (
        main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--kind", kind, "--out", str(out)])
        == 0
    )
    assert str(out) in capsys.readouterr().out
    tok = load(out)
    assert tok.name == out.name and tok.vocab_size <= 400
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert len(tok.encode(TEXT)) < len(TEXT.encode()) / 1.5  # it learned pieces longer than a byte


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_train_with_several_special_tokens(corpus, tmp_path, kind):
    if kind != "bpe":
        pytest.importorskip("sentencepiece")
    out = tmp_path / "tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(corpus),
                "--vocab-size",
                "400",
                "--kind",
                kind,
                "--special-tokens",
                "<|endoftext|>",
                "<|pad|>",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    tok = load(out)
    assert set(tok.special_tokens) == {"<|endoftext|>", "<|pad|>"}
    ids = tok.encode("a<|pad|>b<|endoftext|>")
    assert tok.special_tokens["<|pad|>"] in ids and ids[-1] == tok.eot_id
    assert tok.decode(ids) == "a<|pad|>b<|endoftext|>"


def test_train_reads_folders_and_ranges(corpus, tmp_path):
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    texts = read_inputs([str(tmp_path)], "0:0.5")
    assert texts == [TEXT[: len(TEXT) // 2]]
    assert cut_range("abcdefghij", "0.8:1") == "ij"


def test_shakespeare_input_is_tegaki_data_s_corpus():
    """`--input shakespeare` reads the one Shakespeare reader, tegaki.data's, and cuts ranges of it."""
    text = shakespeare_text()
    assert read_inputs(["shakespeare"]) == [text]
    assert read_inputs(["shakespeare"], "0:0.01") == [cut_range(text, "0:0.01")]


def test_shakespeare_input_has_no_markdown():
    (text,) = read_inputs(["shakespeare"])
    assert len(text) > 4_000_000 and "ROMEO" in text
    assert "**" not in text and "\n#" not in text and "  \n" not in text


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"  \n\n", "is empty"),
        (b"ELF\x00\x01\x02binary", "binary"),
        (b"caf\xe9 latin-1", "not UTF-8"),
    ],
)
def test_bad_input_files_are_named_in_the_error(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    assert main(["tokenizer", "train", "--input", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(bad) in err and "Traceback" not in err


def test_other_mistakes_give_clear_errors(corpus, tmp_path, capsys):
    cases = [
        (["train", "--input", str(corpus), "--vocab-size", "200", "--out", str(tmp_path / "o")], "256 byte tokens"),
        (
            ["train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300", "--out", str(tmp_path / "o")],
            "does not exist",
        ),
        (
            [
                "train",
                "--input",
                str(corpus),
                "--vocab-size",
                "300",
                "--range",
                "0.9:0.1",
                "--out",
                str(tmp_path / "o"),
            ],
            "start < end",
        ),
        (
            [
                "train",
                "--input",
                str(corpus),
                "--vocab-size",
                "300",
                "--special-tokens",
                "<a>",
                "<a>",
                "--out",
                str(tmp_path / "o"),
            ],
            "distinct",
        ),
        (["stats", "--tokenizer", str(tmp_path / "nowhere"), "--input", str(corpus)], "known names: gpt2"),
        (["show", "--tokenizer", str(tmp_path), "text"], "holds no tokenizer"),
    ]
    for argv, message in cases:
        assert main(["tokenizer", *argv]) == 2
        assert message in capsys.readouterr().err


def test_show_marks_partial_characters_as_bytes(capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["tokenizer", "show", "--tokenizer", "gpt2", "語の"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "<e8 aa>|<9e>|の"  # GPT-2: e8 aa + 9e, then の whole
    assert "\033[" not in out
    assert printable_piece(b"a\n\xe3\x81") == "a\\n<e3 81>"
    assert printable_piece(b"\x81x") == "<81>x"


def test_show_survives_a_command_line_byte_that_is_not_utf8(capsys, monkeypatch):
    """A shell passes b"abc\xff" to Python as "abc\udcff"; show must count it, not crash."""
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["tokenizer", "show", "--tokenizer", "gpt2", "abc\udcff"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("4 characters, 4 bytes")


def test_colour_only_on_a_terminal_without_no_color(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour(Terminal())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour(Terminal())
    monkeypatch.delenv("NO_COLOR")
    assert not use_colour(io.StringIO())  # a pipe or file, not a terminal


def test_stats_by_script(capsys):
    gpt2 = load("gpt2")
    stats = token_stats(gpt2, "語の cat")  # <e8 aa> <9e> の " cat"
    assert stats.total.tokens == 4 and stats.total.chars == 6
    kanji, kana, latin = (stats.by_script[s] for s in ("kanji", "kana", "latin"))
    assert (kanji.tokens, kanji.chars, kanji.partial) == (2, 1, 2)
    assert (kana.tokens, kana.chars, kana.partial) == (1, 1, 0)
    assert (latin.tokens, latin.chars, latin.bytes) == (1, 4, 4)
    assert main(["tokenizer", "stats", "--tokenizer", "gpt2", "--input", "shakespeare", "--range", "0:0.01"]) == 0
    assert "chars/token" in capsys.readouterr().out


def test_readable_trainer_and_tokenizers_backend_agree():
    pytest.importorskip("tokenizers")
    text = shakespeare_text()
    train_text, held_out = text[:300_000], text[-100_000:]
    ours = train_bpe(train_text, 256 + 500 + 1, pattern="gpt4")
    theirs = train_bpe_tokenizers(train_text, 256 + 500 + 1, pattern="gpt4")
    assert theirs.vocab_size == ours.vocab_size
    # Ties between equally frequent pairs are broken differently, so late merges may come in another
    # order; the frequent ones agree, and so does the compression, within 1%.
    first = range(256, 256 + 100)
    assert {ours.token_bytes(i) for i in first} == {theirs.token_bytes(i) for i in first}
    n_ours, n_theirs = len(ours.encode(held_out)), len(theirs.encode(held_out))
    assert abs(n_ours - n_theirs) <= 0.01 * n_ours


def test_sentencepiece_vocab_too_small_names_tegaki_s_own_flag(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    text = tmp_path / "kanji.txt"
    text.write_text("".join(chr(0x4E00 + i) for i in range(600)) * 2, encoding="utf-8")
    code = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(text),
            "--vocab-size",
            "300",
            "--kind",
            "unigram",
            "--out",
            str(tmp_path / "tok"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--vocab-size 300 is too small" in err and "character_coverage" not in err


def test_stats_on_an_empty_file_says_there_is_nothing_to_measure(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["tokenizer", "stats", "--tokenizer", "gpt2", "--input", str(empty)]) == 2
    assert "nothing to measure" in capsys.readouterr().err
