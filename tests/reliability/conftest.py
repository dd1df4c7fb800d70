"""Shared pieces of the reliability suite: a small corpus, its shards, a trained run folder
(reliability_helpers.py: running a command in this process, snapshots of folders)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from reliability_helpers import cli, train_args

from tegaki import data


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "plays.txt").write_text(data.shakespeare_text()[:30_000])
    return folder / "plays.txt"


@pytest.fixture(scope="session")
def shards(corpus, tmp_path_factory) -> Path:
    from tegaki.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("prepared")
    tok = train_bpe(corpus.read_text(), 300, name="bpe-300")
    tok.save(folder / "tok")
    data.prepare(str(corpus), tok, folder / "shards", tokenizer_ref=str(folder / "tok"), progress=False)
    return folder / "shards"


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory) -> Path:
    """A run folder of 4 steps from raw text: its own tokenizer, data, checkpoints 2 and 4, metrics."""
    out = tmp_path_factory.mktemp("trained") / "run"
    rc, err = cli(train_args(out, corpus, 4))
    assert rc == 0, err
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A copy of the trained run folder that a test may damage."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"
