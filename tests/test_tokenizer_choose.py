"""The default a corpus gets: gpt4's pre-tokenization for Japanese/CJK and mixed text, gpt2's otherwise;
held-out documents for measuring it."""

from pathlib import Path

import pytest

from tegaki.cli import main
from tegaki.tokenizer import load
from tegaki.tokenizer.choose import AUTO, choose_pattern, cjk_share
from tegaki.tokenizer.kinds import train_tokenizer
from tegaki.tokenizer.stats import documents_stats

JAPANESE = (
    "名前\nls - ディレクトリの内容をリスト表示する。\n\n書式\nls [オプション]... [ファイル]...\n\n説明\n"
    "ファイルの情報を表示する。オプションが指定されない場合は、カレントディレクトリを対象とする。\n"
    "「-a」を指定すると、. で始まる名前のファイルも表示する。終了ステータスは、正常なら 0 を返す。\n"
)
ENGLISH = "NAME\nls - list directory contents\n\nSYNOPSIS\nls [OPTION]... [FILE]...\n\nDESCRIPTION\n" * 2
SHARED_JA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ja_manpages_sec1.txt"


def test_cjk_share_counts_letters_only():
    assert cjk_share(["日本語 abc"]) == pytest.approx(3 / 6)
    assert cjk_share(["12345 !!!"]) == 0.0
    assert cjk_share([JAPANESE]) > 0.8 and cjk_share([ENGLISH]) == 0.0
    assert cjk_share(["あ" * 10, "a" * 10], sample_chars=10) == 1.0  # only the sample is read


def test_japanese_and_mixed_corpora_get_gpt4_and_english_keeps_gpt2():
    assert choose_pattern([JAPANESE]).pattern == "gpt4"
    assert choose_pattern([ENGLISH, JAPANESE]).pattern == "gpt4"  # mixed: a third of the letters
    english = choose_pattern([ENGLISH])
    assert english.pattern == "gpt2" and "0%" in english.reason
    assert "kanji" in choose_pattern([JAPANESE]).reason


def test_train_tokenizer_resolves_auto_and_kind_still_overrides():
    assert train_tokenizer([JAPANESE * 3], 300).pattern_name == "gpt4"
    assert train_tokenizer([ENGLISH * 3], 300).pattern_name == "gpt2"
    assert train_tokenizer([JAPANESE * 3], 300, pattern="gpt2").pattern_name == "gpt2"
    pytest.importorskip("sentencepiece")
    assert train_tokenizer([JAPANESE * 20], 400, kind="unigram", pattern=AUTO).kind == "sentencepiece"


def _write_pages(folder: Path, n: int) -> Path:
    """n manual pages in one file, each starting with a header line that names it at both ends."""
    pages = [f"PAGE{i}(1) ユーザーコマンド PAGE{i}(1)\n\n" + JAPANESE.replace("ls", f"cmd{i}") for i in range(n)]
    path = folder / "pages.txt"
    path.write_text("".join(pages), encoding="utf-8")
    return path


def test_cli_train_says_which_pattern_and_why_and_measures_held_out_documents(tmp_path, capsys):
    pages = _write_pages(tmp_path, 10)
    out = tmp_path / "tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(pages),
                "--vocab-size",
                "400",
                "--out",
                str(out),
                "--doc-start",
                "manpage",
                "--held-out",
                "0.2",
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert "pattern gpt4:" in said and "kanji" in said
    assert "held out 2 of 10 documents" in said
    assert load(out).pattern_name == "gpt4"

    assert (
        main(
            [
                "tokenizer",
                "stats",
                "--tokenizer",
                str(out),
                "--input",
                str(pages),
                "--doc-start",
                "manpage",
                "--held-out",
                "0.2",
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert "the 2 held-out documents of 10" in said
    held_chars = 2 * len("PAGE9(1) ユーザーコマンド PAGE9(1)\n\n" + JAPANESE.replace("ls", "cmd9"))
    assert f"{held_chars:,} characters" in said


def test_cli_pattern_and_kind_override_the_choice(tmp_path, capsys):
    pages = _write_pages(tmp_path, 3)
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(pages),
                "--vocab-size",
                "400",
                "--out",
                str(tmp_path / "t2"),
                "--pattern",
                "gpt2",
            ]
        )
        == 0
    )
    assert "pattern gpt2" in capsys.readouterr().out and load(tmp_path / "t2").pattern_name == "gpt2"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--held-out", "0.2"], "needs at least 5 documents, found 1"),
        (["--held-out", "1.5", "--doc-start", "manpage"], "between 0 and 1"),
        (["--held-out", "0.2", "--range", "0:0.5"], "not both"),
        (["--held-out", "0.2", "--doc-start", "(unclosed"], "not a regular expression"),
    ],
)
def test_held_out_mistakes_are_explained(tmp_path, capsys, argv, message):
    pages = _write_pages(tmp_path, 3)
    code = main(
        ["tokenizer", "train", "--input", str(pages), "--vocab-size", "400", "--out", str(tmp_path / "t"), *argv]
    )
    assert code != 0 and message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_JA.exists(), reason=f"the Japanese manual pages are not at {SHARED_JA}")
def test_on_unseen_manual_pages_the_chosen_pattern_beats_gpt2(tmp_path):
    """Real Japanese: the default beats the old gpt2 default on pages it never saw (small vocabulary,
    a fifth of the pages, so it stays quick)."""
    from tegaki.cli.tokenizer import read_documents, split_held_out

    docs = read_documents([str(SHARED_JA)], "manpage", "nothing to learn from")
    assert len(docs) > 300  # the header rule finds the pages
    train, held = split_held_out(docs[:60], 0.2)
    chosen = train_tokenizer(train, 2000)
    assert chosen.pattern_name == "gpt4"
    old = train_tokenizer(train, 2000, pattern="gpt2")
    chosen_cpt = documents_stats(chosen, held).total.chars_per_token
    assert chosen_cpt > 1.03 * documents_stats(old, held).total.chars_per_token
