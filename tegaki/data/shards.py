"""Documents -> token shards: `prepare` cuts a corpus into pieces, tokenizes them in parallel and
writes one train and one validation shard per piece.

  1. pieces      `iter_pieces`: documents cut into ~1 MB pieces, so several cores can tokenize at once.
  2. tokens      every document ends with the end-of-text token, so the model learns where one
                 story stops and the next begins (`Encoder`).
  3. shards      `prepare`: one train shard and one validation shard per piece (the last
                 `val_fraction` of each piece's tokens), written atomically, so an interrupted
                 run picks up where it stopped; `meta.json`, written last, marks the folder complete.

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
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tegaki.data.corpora import iter_documents, source_size
from tegaki.errors import TegakiError
from tegaki.files import atomic_write, atomic_write_json, explain_os_error
from tegaki.tokenizer.base import valid_unicode

SHARD_MAGIC = b"TGKTOKS\0"
SHARD_VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, itemsize, count, reserved -> 32 bytes
PIECE_CHARS = 1 << 20  # ~1 MB of text per piece: one unit of parallel work, one shard pair
VAL_FRACTION = 0.05  # the share of each piece's tokens kept for validation


# =================================================================================================
# 1. Pieces: the units of parallel work
# =================================================================================================


def _safe_cut(text: str, target: int) -> int | None:
    """A place at or after `target` where cutting does not change the tokens: right after a lone
    newline between two non-spaces ("x\nY"). The pre-tokenizer makes that newline a token of its
    own whether or not the text goes on, and "Y..." starts a new chunk either way. (After "\n\n"
    it would not be safe: at the end of a text the two newlines merge into one chunk.)"""
    match = re.compile(r"(?<=\S)\n(?=\S)").search(text, target)
    return match.end() if match else None


def iter_pieces(
    documents: Iterable[tuple[str, str]], piece_chars: int = PIECE_CHARS
) -> Iterator[list[tuple[str, bool]]]:
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
# 2. Tokens: a fast encoder beside the readable one
# =================================================================================================


class Encoder:
    """Text -> ids for data preparation.

    The readable path is the tokenizer's own `encode_ordinary` (pure Python). For a
    byte-level BPE the same vocabulary is handed to tiktoken, whose Rust core gives the same ids
    (checked per vocabulary, and by tests/test_data.py) faster and lets threads run in
    parallel; `fast=False` keeps to the readable loop.
    """

    def __init__(self, tokenizer, fast: bool = True):
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.eot_id
        self.fast = _tiktoken_encoding(tokenizer) if fast else None
        self.releases_gil = self.fast is not None

    def encode(self, text: str) -> list[int]:
        if self.fast is not None:
            return self.fast.encode_ordinary(text)
        readable = getattr(self.tokenizer, "encode_readable", None)  # a BPE's own loop, not tiktoken
        return readable(valid_unicode(text)) if readable else self.tokenizer.encode_ordinary(text)

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
    """tiktoken's Encoding of a byte-level BPE, or None. The tokenizer builds it and checks that it
    gives the same ids as its readable loop (tegaki.tokenizer.compiled); other kinds have none."""
    compiled_encoder = getattr(tokenizer, "compiled_encoder", None)
    return compiled_encoder() if compiled_encoder is not None else None


# =================================================================================================
# 3. Shards
# =================================================================================================


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and memory when every id fits (GPT-2's 50,257 does); else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Header + tokens, written to a temporary file and renamed: a shard is whole or absent."""
    tokens = np.ascontiguousarray(tokens)
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"shard tokens must be uint16 or uint32, got {tokens.dtype}")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(SHARD_MAGIC, SHARD_VERSION, tokens.dtype.itemsize, tokens.size))
            f.write(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())

    atomic_write(path, write)


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
        raise TegakiError(
            f"{path} is truncated or damaged ({path.stat().st_size} bytes, expected {expected}); "
            "run `tegaki prepare` again"
        )
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
    val_fraction: float = VAL_FRACTION,
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
    _check_numbers(val_fraction, workers, piece_chars)
    folder = Path(out)
    dtype = token_dtype(tokenizer.vocab_size)
    settings = {
        "data": str(data),
        "tokenizer": tokenizer_ref or tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "val_fraction": val_fraction,
        "piece_chars": piece_chars,
        "text_column": text_column,
    }
    _claim_folder(folder, settings)
    if (folder / "meta.json").exists():
        return PrepareResult(folder, load_meta(folder), 0.0, 0)
    workers = workers or min(os.cpu_count() or 1, 8)
    pieces = iter_pieces(iter_documents(data, text_column), piece_chars)
    bar = _progress_bar(total=source_size(str(data)), enabled=progress, desc="prepare")
    start = time.perf_counter()
    with _pool(Encoder(tokenizer, fast=fast), workers) as pool:
        n_pieces, text_bytes = _encode_pieces(pool, workers, pieces, folder, dtype, val_fraction, bar)
    bar.close()
    seconds = time.perf_counter() - start
    if n_pieces == 0:
        raise TegakiError(f"the corpus {data!r} holds no text")
    meta = _summarise(folder, n_pieces, settings, tokenizer, dtype)
    if meta["train_tokens"] == 0:
        raise TegakiError(f"the corpus {data!r} holds no text")
    atomic_write_json(folder / "meta.json", meta)
    return PrepareResult(folder, meta, seconds, text_bytes)


def _check_numbers(val_fraction: float, workers: int | None, piece_chars: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise TegakiError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers is not None and (type(workers) is not int or workers < 1):
        raise TegakiError(f"--workers must be at least 1 (or left out: every core), got {workers}")
    if type(piece_chars) is not int or piece_chars < 1:
        raise TegakiError(f"--piece-chars must be at least 1, got {piece_chars}")


def _claim_folder(folder: Path, settings: dict[str, Any]) -> None:
    """Create `folder` and record the settings in prepare.json; a folder prepared with other
    settings is refused, so a resumed preparation never mixes two tokenizations."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise explain_os_error(folder, e, doing="create") from None
    settings_path = folder / "prepare.json"
    if not settings_path.exists():
        atomic_write_json(settings_path, settings)
        return
    previous = read_json(settings_path, "run `tegaki prepare` again into an empty folder")
    if previous != settings:
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        raise TegakiError(
            f"{folder} holds shards prepared with other settings ({', '.join(changed)} differ); "
            "use another --out folder or delete this one"
        )


def _pool(encoder: Encoder, workers: int):
    """tiktoken releases the GIL, so threads share one encoder; the Python encoder needs processes."""
    if encoder.releases_gil or workers == 1:
        return ThreadPoolExecutor(workers, initializer=_init_worker, initargs=(encoder,))
    import multiprocessing

    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(encoder,))


def _encode_pieces(pool, workers: int, pieces, folder: Path, dtype: np.dtype, val_fraction: float, bar):
    """Encode the pieces whose shards are missing, at most 2 x workers in flight, and write each
    as it comes back. Returns (pieces in the corpus, bytes of text encoded)."""
    text_bytes = 0
    n_pieces = 0
    pending = set()
    for index, piece in enumerate(pieces):
        n_pieces = index + 1
        if (folder / f"train_{index:06d}.bin").exists() and (folder / f"val_{index:06d}.bin").exists():
            bar.update(sum(len(t) for t, _ in piece))  # done before an interruption
            continue
        pending.add(pool.submit(_encode_in_worker, index, piece, dtype.str))
        if len(pending) >= 2 * workers:  # bounded: a huge corpus never sits in memory at once
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            text_bytes += _write_pieces(done, folder, val_fraction, bar)
    text_bytes += _write_pieces(pending, folder, val_fraction, bar)
    return n_pieces, text_bytes


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
    meta = read_json(path, "delete it and run `tegaki prepare` again (the shards are kept)")
    wanted = {"tokenizer": str, "vocab_size": int}
    wrong = [k for k, kind in wanted.items() if not isinstance(meta.get(k), kind)]
    if wrong:
        raise TegakiError(
            f"{path} is damaged (no {', '.join(wrong)}); delete it and run `tegaki prepare` again (the shards are kept)"
        )
    return meta


def read_json(path: Path, fix: str) -> dict[str, Any]:
    """A JSON object from a file tegaki wrote; damage is one message naming the file and `fix`."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise explain_os_error(path, e, doing="read") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise TegakiError(f"{path} is damaged ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise TegakiError(f"{path} is damaged (not a JSON object); {fix}")
    return value


def is_prepared(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "meta.json").exists() and (Path(folder) / "prepare.json").exists()
