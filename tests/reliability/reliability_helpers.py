"""Helpers of the reliability suite: run a command in this process, snapshot a folder."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

from tegaki.cli import main

# A model small enough that a step takes milliseconds; the run saves every 2 steps.
MICRO = [
    "--set",
    "n_layer=1",
    "--set",
    "n_embd=32",
    "--set",
    "n_head=2",
    "--set",
    "block_size=32",
    "--eval-batches",
    "1",
    "--eval-every",
    "2",
    "--save-every",
    "2",
    "--sample-every",
    "0",
    "--dtype",
    "fp32",
    "--device",
    "cpu",
    "--batch-size",
    "2",
    "--no-progress",
]


def cli(args: list[str]) -> tuple[int, str]:
    """Run `tegaki ARGS` in this process: (exit code, what it wrote to stderr)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(args)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    return rc, err.getvalue()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and the sha256 of its bytes: equal snapshots, nothing lost or changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def train_args(out: Path, data_path, steps: int, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data_path),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--set",
        "vocab_size=320",
        *MICRO,
        *extra,
    ]
