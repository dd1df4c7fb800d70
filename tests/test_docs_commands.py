"""Every shell command in README*.md and docs/*.md runs, or is marked as illustrative.

A command is a line of a ```bash block, or a `$ tegaki ...` line of a ```text block (a command shown
with its output). A block whose fence follows the line `<!-- illustrative: why -->` is not run (it
needs a GPU, the network, a corpus that is not shipped, hours, or a person at the keyboard), but its
commands are still checked: a `tegaki` command (also as `python -m tegaki` or under torchrun) must
parse, a `make` target and variable must be the Makefile's, a `python` script or module and a
`pip install -e '.[extra]'` extra must exist, and so must every repository path the pages name. A
command written inline in the prose (`tegaki generate --model runs/demo "HAMLET:"`) is checked the
same way, where a fragment (`tegaki generate --verbose`) may leave out the required arguments.

Every other command is run, in the order of the pages, in one scratch folder, with small settings
substituted where the real ones would take minutes: a corpus of 100k characters for `shakespeare`,
a few steps, tiny batches, few tokens; so are the `tegaki` commands `make demo` runs and the whole
ones of the prose (no placeholder, nothing left out). The Makefile's own choices (which Python, how
many threads, the hint where pip may not install) are checked too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
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


def inline_commands(page: Path) -> list[tuple[int, str]]:
    """(line number, command) for the commands written in `backticks` in the prose of one page."""
    found, in_block = [], False
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block
        elif not in_block:
            found += [(n, span) for span in re.findall(r"`([^`]+)`", line) if INLINE.match(span)]
    return found


INLINE = re.compile(r"([A-Z_][A-Z0-9_]*=\S*\s+)*(tegaki|make|python3?|pip|torchrun)\s")


def all_inline_commands() -> list[tuple[str, str]]:
    return [
        (f"{page}:{n}", command)
        for page in PAGES
        if (ROOT / page).exists()
        for n, command in inline_commands(ROOT / page)
    ]


def words(command: str) -> list[str]:
    """The command's words, without the `NAME=value` environment in front of it."""
    argv = shlex.split(command, comments=True)
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
        argv = argv[1:]
    return argv


def tegaki_arguments(argv: list[str]) -> list[str] | None:
    """The arguments `tegaki` gets from `tegaki ...`, `python -m tegaki ...` or `torchrun ... -m tegaki ...`."""
    if argv[:1] == ["tegaki"]:
        return argv[1:]
    # (a regular expression: tests/conftest.py marks a test that names "torchrun" alone as distributed)
    if argv and re.fullmatch(r"python3?|torchrun", argv[0]):
        for i in range(len(argv) - 1):
            if argv[i : i + 2] == ["-m", "tegaki"]:
                return argv[i + 2 :]
    return None


class ParseError(Exception):
    pass


def parse(parser: argparse.ArgumentParser, arguments: list[str]) -> str:
    """Parse as `tegaki` would; what it printed (a --help), or ParseError with the parser's complaint."""

    def error(self, message):
        raise ParseError(message)

    original, printed = argparse.ArgumentParser.error, io.StringIO()
    argparse.ArgumentParser.error = error
    try:
        with contextlib.redirect_stdout(printed):
            parser.parse_args(arguments)
    except SystemExit:  # --help, --version
        pass
    finally:
        argparse.ArgumentParser.error = original
    return printed.getvalue()


def parse_problem(parser: argparse.ArgumentParser, arguments: list[str], fragment: bool) -> str | None:
    """What the CLI's parser says against these arguments, or None if it takes them. A fragment
    (`...` or a placeholder such as RUN in it, or a command named in the prose) may leave out
    arguments, but the flags it names must be its command's."""
    placeholder = re.compile(r"[A-Z][A-Z_]+(\.\w+)?")  # RUN, OUT.gguf, COMMAND
    fragment = fragment or any(a in ("...", "…") or placeholder.fullmatch(a) for a in arguments)
    arguments = [a for a in arguments if a not in ("...", "…")]
    if arguments and placeholder.fullmatch(arguments[0]):  # `tegaki COMMAND --help`: any command
        return next(filter(None, (parse_problem(parser, [c, *arguments[1:]], True) for c in parser.commands)), None)
    try:
        parse(parser, arguments)
    except ParseError as e:
        if not fragment or not ("are required" in str(e) or "expected one argument" in str(e)):
            return str(e)
        command = list(itertools.takewhile(lambda a: not a.startswith("-"), arguments))  # `tokenizer train`
        usage = parse(parser, [*command, "--help"])
        flags = [a.split("=")[0] for a in arguments if a.startswith("--")]
        unknown = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", usage)]
        return f"unrecognized arguments: {' '.join(unknown)}" if unknown else None
    return None


def is_fragment(command: str) -> bool:
    """Whether a command named in the prose may leave out arguments: not when it has a quoted prompt."""
    return not re.search("[\"']", command)


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
    """Flags that do not exist (`generate --prompt`), a missing required flag, a bad choice: found
    here, illustrative or not, in blocks and in the prose, in milliseconds."""
    parser = build_parser()
    checked, bad = 0, []
    for where, command, fragment in [(w, c, False) for w, c, _ in all_commands()] + [
        (w, c, is_fragment(c)) for w, c in all_inline_commands()
    ]:
        arguments = tegaki_arguments(words(command))
        if arguments is None:
            continue
        checked += 1
        problem = parse_problem(parser, arguments, fragment)
        if problem:
            bad.append(f"{where}: {command}\n    -> {problem}")
    assert checked > 100
    assert bad == [], "\n".join(bad)


def test_a_wrong_command_is_caught():
    """The check above can fail: an unknown flag, a missing --model, a bad choice, a fragment's bad flag."""
    parser = build_parser()
    assert parse_problem(parser, ["generate", "--model", "runs/demo", "--prompt", "x"], False)
    assert parse_problem(parser, ["generate", "USER:\\nWhat is 3 plus 4?"], False)
    assert parse_problem(parser, ["generate", "--model", "m", "--quantize", "int3", "x"], False)
    assert parse_problem(parser, ["generate", "--verbose"], True) is None
    assert parse_problem(parser, ["generate", "--loud"], True)
    assert parse_problem(parser, ["COMMAND", "--loud"], True)
    assert not is_fragment('tegaki generate "USER:\\nWhat is 3 plus 4?"')  # a prompt without --model
    assert is_fragment("tegaki generate --verbose")
    assert parse_problem(parser, ["--version"], False) is None


def makefile() -> tuple[set[str], set[str]]:
    """(targets, variables) of the Makefile."""
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):(?!=)", text, re.M))
    variables = set(re.findall(r"^\s*([A-Z_]+)\s*[?:]?=", text, re.M)) | set(
        re.findall(r"^\s*ifn?def ([A-Z_]+)", text, re.M)
    )
    return targets, variables


def extras() -> set[str]:
    """The optional dependencies' names in pyproject.toml (`pip install -e '.[serve]'`)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


def what_is_wrong(argv: list[str]) -> list[str]:
    """What a `make`, `python` or `pip install` command names that the repository lacks."""
    targets, variables = makefile()
    wrong = []
    if argv[0] == "make":
        for word in argv[1:]:
            name = word.split("=", 1)[0]
            if "=" in word and name not in variables:
                wrong.append(f"no variable {name} in the Makefile")
            elif "=" not in word and not word.startswith("-") and word not in targets:
                wrong.append(f"no target {word} in the Makefile")
    elif argv[0] in ("python", "python3") and len(argv) > 1 and argv[1:3] != ["-m", "tegaki"]:
        module = argv[2] if argv[1] == "-m" else None
        script = ROOT / (module.replace(".", "/") + ".py" if module else argv[1])
        if module and (ROOT / module.split(".")[0]).is_dir():  # the repository's own: benchmarks.bench_gpu
            wrong += [] if script.exists() else [f"no module {module} in the repository"]
        elif module:
            wrong += [] if importlib.util.find_spec(module.split(".")[0]) else [f"no module {module}"]
        elif not script.exists():
            wrong.append(f"no script {argv[1]}")
        if script.exists():  # each --flag is named in the script or a module beside it
            beside = " ".join(f.read_text() for f in script.parent.glob("*.py"))
            flags = [a for a in argv[2:] if a.startswith("--")]
            wrong += [f"{script.relative_to(ROOT)} has no {flag}" for flag in flags if f'"{flag}"' not in beside]
    elif argv[:3] == ["pip", "install", "-e"]:
        asked = re.fullmatch(r"\.\[([\w,-]+)\]", argv[3])
        wrong += [
            f"no extra {e} in pyproject.toml" for e in (asked.group(1).split(",") if asked else []) if e not in extras()
        ]
    return wrong


def test_every_make_python_and_pip_command_names_what_the_repository_has():
    checked, bad = 0, []
    for where, command in [(w, c) for w, c, _ in all_commands()] + all_inline_commands():
        argv = words(command)
        if argv and argv[0] in ("make", "python", "python3", "pip"):
            checked += 1
            bad += [f"{where}: {command}  -> {w}" for w in what_is_wrong(argv)]
    assert checked > 30
    assert bad == [], "\n".join(bad)
    assert what_is_wrong(["make", "demo", "THREAD=2"]) and what_is_wrong(["make", "tests"])
    assert what_is_wrong(["python", "scripts/none.py"]) and what_is_wrong(["python", "-m", "benchmarks.none"])
    assert what_is_wrong(["python", "-m", "benchmarks.bench_gpu", "--loud"]) and what_is_wrong(
        ["python", "-m", "htttp"]
    )
    assert what_is_wrong(["pip", "install", "-e", ".[servr]"])


SHIPPED = re.compile(r"(?<![\w./-])((?:\.\./)*(?:tegaki|docs|scripts|benchmarks|tests|\.ci)/[\w./+-]*\w/?)")


def test_every_repository_path_the_pages_name_exists():
    """`tegaki/hf.py` after hf became a package, a link to a moved script: stale pointers fail here."""
    bad = []
    for page in PAGES:
        for n, line in enumerate((ROOT / page).read_text().splitlines(), 1):
            prose = re.sub(r"`[^`]*`", "", line)  # code such as `{...}[config.mlp](config)` is no link
            links = re.findall(r"\]\((?!https?:|#|mailto:)([^)#\s]+)", prose)
            named = [re.sub(r"^(\.\./)+", "", m) for m in SHIPPED.findall(line)]
            for path in {(ROOT / page).parent / link for link in links} | {ROOT / m for m in named}:
                if not path.resolve().exists():
                    bad.append(f"{page}:{n}: {path.resolve().relative_to(ROOT.resolve())}")
    assert bad == [], "\n".join(sorted(set(bad)))


# -------------------------------------------------------------------------------------------------
# The Makefile: the README's two commands
# -------------------------------------------------------------------------------------------------


def make(*arguments: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """`make ARGUMENTS` with the Makefile of this checkout and none of the caller's choices
    (`make test PYTHON=...` passes its variables down through MAKEFLAGS)."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    drop = {"PYTHON", "THREADS", "OMP_NUM_THREADS", "VIRTUAL_ENV", "CONDA_PREFIX", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    clean = {k: v for k, v in os.environ.items() if k not in drop} | env
    command = ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), *arguments]
    return subprocess.run(command, cwd=cwd, env=clean, capture_output=True, text=True, timeout=60)


def make_demo_commands(*arguments: str, **env: str) -> list[str]:
    """The commands `make demo` runs after installing, as `tegaki ...`, from `make -n demo`."""
    lines = make("-n", "demo", *arguments, **env).stdout.splitlines()
    return ["tegaki " + line.split(" -m tegaki ", 1)[1] for line in lines if " -m tegaki " in line]


def test_make_demo_runs_what_the_readmes_say_it_runs():
    commands = make_demo_commands("PYTHON=python3")
    assert [c.split()[1] for c in commands] == ["train", "generate"]
    parser = build_parser()
    for command in commands:
        assert parse_problem(parser, words(command)[1:], False) is None, command
        for readme in ("README.md", "README.ja.md"):
            assert f"`{command}`" in (ROOT / readme).read_text(), f"{readme} does not say that make demo runs {command}"


def test_make_uses_the_virtual_environment_beside_it(tmp_path):
    """A fresh clone after `python3 -m venv .venv`: make demo uses .venv/bin/python unasked."""
    assert " python3 -m tegaki train " in f" {make('-n', 'demo', cwd=tmp_path).stdout}"
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)
    assert " .venv/bin/python -m tegaki train " in make("-n", "demo", cwd=tmp_path).stdout
    activated = make("-n", "demo", cwd=tmp_path, VIRTUAL_ENV="/somewhere/else").stdout
    assert " python3 -m tegaki train " in activated  # an activated environment's python3
    assert " other/python -m tegaki train " in make("-n", "demo", "PYTHON=other/python", cwd=tmp_path).stdout


def test_make_demo_threads():
    """OMP_NUM_THREADS for the demo: THREADS, else the caller's own, else the free cores (at least one)."""

    def threads(*arguments, **env) -> set[str]:
        return set(re.findall(r"OMP_NUM_THREADS=(\S+) \S+ -m tegaki", make("-n", "demo", *arguments, **env).stdout))

    assert threads("THREADS=3") == {"3"}
    assert threads(OMP_NUM_THREADS="5") == {"5"}
    if Path("/proc/loadavg").exists() and shutil.which("nproc"):
        (chosen,) = threads()
        assert 1 <= int(chosen) <= os.cpu_count()


def test_make_check_says_where_pip_may_not_install(tmp_path):
    """A Python pip may install into passes; a virtual environment without pip and a system Python
    marked EXTERNALLY-MANAGED (PEP 668, Debian's) stop with the line that fixes it."""
    assert make("check", f"PYTHON={sys.executable}").returncode == 0
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    no_pip = make("check", f"PYTHON={tmp_path / 'env' / 'bin' / 'python'}")
    assert no_pip.returncode != 0 and "python3 -m venv .venv" in no_pip.stdout, no_pip.stdout
    missing = make("check", f"PYTHON={tmp_path / 'nothing'}")
    assert missing.returncode != 0 and "python3 -m venv .venv" in missing.stdout
    system = sorted(Path("/usr/bin").glob("python3.*[0-9]"))
    managed = next((p for p in system if (Path("/usr/lib") / p.name / "EXTERNALLY-MANAGED").exists()), None)
    if managed is None:
        pytest.skip("no system Python marked EXTERNALLY-MANAGED here")
    refused = make("check", f"PYTHON={managed}")
    assert refused.returncode != 0 and "PEP 668" in refused.stdout and "python3 -m venv .venv" in refused.stdout


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


def whole_inline_commands() -> list[tuple[str, str, bool]]:
    """The `tegaki` commands of the prose that are whole: no placeholder, nothing left out, no --help,
    more than the command's name (`tegaki train` in a sentence names the command)."""
    parser, whole = build_parser(), []
    for where, command in all_inline_commands():
        arguments = tegaki_arguments(words(command))
        if arguments is None or len(arguments) < 2 or {"--help", "--version", "...", "…"} & set(arguments):
            continue
        placeholders = any(re.fullmatch(r"[A-Z][A-Z_]+(\.\w+)?", a) for a in arguments)
        if not placeholders and parse_problem(parser, arguments, False) is None:
            whole.append((where, command, False))
    return whole


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
    made = [("Makefile (make -n demo)", command, False) for command in make_demo_commands("PYTHON=python3")]
    for where, command, illustrative in made + all_commands() + whole_inline_commands():
        argv = words(command)
        if illustrative or command in done:  # the Japanese pages repeat the English commands
            continue
        done.add(command)
        code = main(small(argv[1:], corpus))
        output = capsys.readouterr()
        if code != 0:
            failed.append(f"{where}: {command}\n{output.err[-600:]}")
    assert failed == [], "\n\n".join(failed)
