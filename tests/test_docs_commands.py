"""Every shell command in README*.md and docs/*.md runs, or is marked as illustrative.

A command is a line of a ```bash block, or a `$ tegaki ...` line of a ```text block (a command shown
with its output). A block whose fence follows the line `<!-- illustrative: why -->` is not run (it
needs a GPU, the network, a corpus that is not shipped, hours, or a person at the keyboard), but its
tegaki commands must still parse. Every other command is run, in the order of the pages, in one
scratch folder, with small settings substituted where the real ones would take minutes: a corpus of
100k characters for `shakespeare`, a few steps, tiny batches, few tokens.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tegaki.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
# The order the pages are read in: a page may use what an earlier one made (runs/demo, runs/cmp-en).
PAGES = [
    "README.md",
    "docs/training.md",
    "docs/generation.md",
    "docs/experiments.md",
    "docs/walkthrough.md",
    "docs/tokenizers.md",
    "docs/architectures.md",
    "docs/serving.md",
    "docs/finetuning.md",
    "docs/web.md",
    "docs/gguf.md",
    "README.ja.md",
    "docs/training.ja.md",
    "docs/generation.ja.md",
    "docs/experiments.ja.md",
    "docs/walkthrough.ja.md",
    "docs/tokenizers.ja.md",
    "docs/architectures.ja.md",
    "docs/serving.ja.md",
    "docs/finetuning.ja.md",
    "docs/web.ja.md",
    "docs/gguf.ja.md",
]
ILLUSTRATIVE = re.compile(r"<!-- illustrative(:[^>]*)? -->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


def doc_commands(page: Path) -> list[tuple[int, str, bool]]:
    """(line number, command, illustrative?) for every command of one page."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence or not fence.group(1):
            i += 1
            continue
        kind, illustrative = fence.group(1), i > 0 and bool(ILLUSTRATIVE.search(lines[i - 1]))
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        body = lines[i + 1 : end]
        if kind in ("bash", "sh", "shell"):
            found += [(i + 2 + n, c, illustrative) for n, c in _joined(body)]
        elif kind == "text":
            found += [(i + 2 + n, c, illustrative) for n, c in _prompted(body)]
        i = end + 1
    return found


def _joined(body: list[str]):
    """Lines of a shell block with `\\` continuations joined; blank and comment-only lines left out."""
    start, parts = None, []
    for n, line in enumerate(body):
        start = n if start is None else start
        parts.append(line.rstrip("\\").strip())
        if not line.rstrip().endswith("\\"):
            command = " ".join(parts).strip()
            if command and not command.startswith("#"):
                yield start, command
            start, parts = None, []


def _prompted(body: list[str]):
    """The `$ ` lines of a text block (a command shown with its output), continuations joined."""
    for n, line in enumerate(body):
        if line.startswith("$ "):
            parts, k = [line[2:]], n
            while parts[-1].rstrip().endswith("\\") and k + 1 < len(body):
                k += 1
                parts.append(body[k])
            yield n, " ".join(part.rstrip().rstrip("\\").strip() for part in parts)


def all_commands():
    pages = [ROOT / p for p in PAGES]
    others = sorted(set(ROOT.glob("README*.md")) | set((ROOT / "docs").glob("*.md")))
    missing = [p.name for p in others if p not in pages]
    assert not missing, f"add these pages to PAGES in {__file__}: {missing}"
    return [
        (f"{page.relative_to(ROOT)}:{n}", command, illustrative)
        for page in pages
        if page.exists()
        for n, command, illustrative in doc_commands(page)
    ]


def test_every_command_is_tegaki_or_marked_illustrative():
    commands = all_commands()
    assert len(commands) > 40
    unmarked = [
        f"{where}: {c}"
        for where, c, illustrative in commands
        if not illustrative and shlex.split(c, comments=True)[0] != "tegaki"
    ]
    assert unmarked == [], "run by no test: mark the block with <!-- illustrative: why -->\n" + "\n".join(unmarked)


def test_every_tegaki_command_in_the_docs_parses():
    """Flags that do not exist (`generate --prompt`) fail here, illustrative or not, in milliseconds."""
    parser = build_parser()
    bad = []
    for where, command, _ in all_commands():
        argv = shlex.split(command, comments=True)
        if argv[0] != "tegaki" or "..." in argv:
            continue
        try:
            _, extra = parser.parse_known_args(argv[1:])
        except SystemExit:
            extra = ["(parse error)"]
        if extra:
            bad.append(f"{where}: {command}  -> {extra}")
    assert bad == [], "\n".join(bad)


# -------------------------------------------------------------------------------------------------
# Running them, small
# -------------------------------------------------------------------------------------------------

SMALL = {  # flag -> the value that keeps a run to seconds, by command
    "compare": {
        "--max-steps": "2",
        "--seeds": "2",
        "--batch-size": "2",
        "--block-size": "32",
        "--eval-every": "1",
        "--eval-batches": "1",
        "--decode-tokens": "4",
        "--sample-tokens": "4",
    },
    "train": {
        "--max-steps": "2",
        "--batch-size": "2",
        "--block-size": "32",
        "--eval-every": "1",
        "--eval-batches": "1",
        "--sample-every": "0",
    },
    "generate": {"--max-new-tokens": "8"},
    "finetune": {"--max-steps": "2", "--eval-every": "1", "--batch-size": "2"},
    "tokenizer": {"--vocab-size": "400"},  # above the distinct characters of the small corpus
}


def small(argv: list[str], corpus: Path) -> list[str]:
    """The command with small settings: each flag of SMALL replaced or added; `shakespeare` made small."""
    argv = [
        str(corpus) if a == "shakespeare" and i and argv[i - 1] in ("--data", "--input") else a
        for i, a in enumerate(argv)
    ]
    if argv[0] == "train" and "--data" not in argv:  # its default corpus is Shakespeare
        argv += ["--data", str(corpus)]
    settings = SMALL.get(argv[0], {})
    if argv[0] == "tokenizer" and argv[1] != "train":
        settings = {}
    for flag, value in settings.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    if argv[0] in ("compare", "train"):
        argv.append("--no-progress")
    return argv


@pytest.mark.slow
def test_every_command_of_the_docs_runs(tmp_path, monkeypatch, capsys):
    from tegaki.data import shakespeare_text

    corpus = tmp_path / "plays.txt"
    corpus.write_text(shakespeare_text()[:100_000])
    (tmp_path / "corpus.txt").write_text(shakespeare_text()[100_000:160_000])  # the docs' "your own text"
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(shakespeare_text()[160_000:200_000])
    (tmp_path / "notes.txt").write_text(shakespeare_text()[200_000:202_000])  # the docs' own files to evaluate
    (tmp_path / "mc.jsonl").write_text('{"context": "To be, or not", "endings": [" to be", " a fish"], "label": 0}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    done, failed = set(), []
    for where, command, illustrative in all_commands():
        argv = shlex.split(command, comments=True)
        if illustrative or command in done:  # the Japanese pages repeat the English commands
            continue
        done.add(command)
        code = main(small(argv[1:], corpus))
        output = capsys.readouterr()
        if code != 0:
            failed.append(f"{where}: {command}\n{output.err[-600:]}")
    assert failed == [], "\n\n".join(failed)
