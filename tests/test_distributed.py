"""DDP and FSDP2 on two CPU processes (gloo, launched by torchrun) against one process.

Two ranks with batch b read exactly the windows one process with batch 2b reads (the loader deals
them out), and both average the loss over the same tokens, so the losses must agree to float
rounding at every step.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tegaki import data
from tegaki.checkpoint import read_metrics

REPO = Path(__file__).resolve().parents[1]
# A fixed warmup longer than the runs: the 2-step and 4-step runs then share one schedule (the default
# warmup is a tenth of --max-steps, which would make the lr of step 2 depend on --max-steps).
MODEL = ["--set", "n_layer=2", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32", "--warmup", "10"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from tegaki.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("dist")
    text = data.shakespeare_text()[:60_000]
    (folder / "plays.txt").write_text(text)
    tok = train_bpe(text, 300, name="bpe-300")
    tok.save(folder / "tok")
    data.prepare(str(folder / "plays.txt"), tok, folder / "shards", tokenizer_ref=str(folder / "tok"), progress=False)
    return folder / "shards"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(shards: Path, out: Path, *, nproc: int, batch: int, steps: int, extra=(), launcher="torchrun"):
    """Train with `nproc` processes: through torchrun (what users run), or by starting the ranks
    directly with the environment torchrun would give them (one process less to start)."""
    args = ["train", "--data", str(shards), "--out", str(out), "--max-steps", str(steps), "--batch-size", str(batch),
            "--dtype", "fp32", "--device", "cpu", "--eval-every", "2", "--eval-batches", "2", "--save-every", "2",
            "--no-progress", "--sample-every", "0", *MODEL, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "tegaki", *args]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stderr
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, "-m", "tegaki", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True,
                         env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                              "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        for r in range(nproc)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stdout + stderr
    return outputs[0][1]


def _curves(out: Path) -> tuple[list[float], list[float]]:
    records = read_metrics(out / "metrics.jsonl")
    train = [r["loss"] for r in records if r.get("kind") is None]
    val = [r["val_loss"] for r in records if r.get("kind") == "val"]
    return train, val


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory) -> tuple[list[float], list[float]]:
    from tegaki.cli import main

    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", "--data", str(shards), "--out", str(out), "--max-steps", "4", "--batch-size", "8",
                 "--dtype", "fp32", "--device", "cpu", "--eval-every", "2", "--eval-batches", "2", "--save-every", "2",
                 "--no-progress", "--sample-every", "0", *MODEL]) == 0
    return _curves(out)


def test_ddp_two_processes_match_one(shards, single, tmp_path):
    _train(shards, tmp_path / "ddp", nproc=2, batch=4, steps=4)
    train, val = _curves(tmp_path / "ddp")
    assert len(train) == 4
    assert train == pytest.approx(single[0], abs=1e-5)
    assert val == pytest.approx(single[1], abs=1e-5)
    # only rank 0 writes: one line per step, not two
    steps = [r["step"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if r.get("kind") is None]
    assert steps == [1, 2, 3, 4]


def test_fsdp2_matches_one_process_and_resumes(shards, single, tmp_path):
    out = tmp_path / "fsdp"
    _train(shards, out, nproc=2, batch=4, steps=2, extra=["--fsdp"], launcher="env")
    log = _train(shards, out, nproc=2, batch=4, steps=4, extra=["--fsdp"], launcher="env")  # gathers, re-shards
    assert "resuming from" in log
    train, val = _curves(out)
    assert train == pytest.approx(single[0], abs=1e-5)
    assert val == pytest.approx(single[1], abs=1e-5)
