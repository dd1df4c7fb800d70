"""DDP and FSDP2 on two CPU processes (gloo, launched by torchrun) against one process.

Two ranks with batch b read exactly the windows one process with batch 2b reads (the loader deals
them out), and both average the loss over the same tokens, so the losses must agree to float
rounding at every step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tegaki import data
from tegaki.checkpoint import read_metrics

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.subprocess]  # `make test-fast` skips these
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


TIMEOUT = 600  # seconds for one launch: minutes more than it takes on a loaded 2-core machine
ATTEMPTS = 3  # a port taken between choosing it and binding it (a shared machine) is retried, not failed
PORT_TROUBLE = (
    "address already in use",
    "eaddrinuse",
    "connection closed by peer",
    "connection refused",
    "connection reset by peer",
    "the server socket has failed to listen",
)


def _train(shards: Path, out: Path, *, nproc: int, batch: int, steps: int, extra=(), launcher="torchrun"):
    """Train with `nproc` processes: through torchrun (what users run), or by starting the ranks
    directly with the environment torchrun would give them (one process less to start).

    Every process is waited for with a timeout and killed on the way out, whatever happens. When
    the ranks could not meet (the chosen port was taken by another program), the run folder is put
    back as it was and the launch tried again with a new port; any other failure fails the test."""
    args = [
        "train",
        "--data",
        str(shards),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--eval-every",
        "2",
        "--eval-batches",
        "2",
        "--save-every",
        "2",
        "--no-progress",
        "--sample-every",
        "0",
        *MODEL,
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    backup = out.with_name(out.name + ".before")
    if out.exists():
        shutil.copytree(out, backup, dirs_exist_ok=True)
    for attempt in range(ATTEMPTS):
        port = str(_free_port())
        if launcher == "torchrun":
            commands = [
                (
                    [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        "--nproc_per_node",
                        str(nproc),
                        "--master_port",
                        port,
                        "-m",
                        "tegaki",
                        *args,
                    ],
                    env,
                )
            ]
        else:
            commands = [
                (
                    [sys.executable, "-m", "tegaki", *args],
                    {
                        **env,
                        "RANK": str(r),
                        "LOCAL_RANK": str(r),
                        "WORLD_SIZE": str(nproc),
                        "LOCAL_WORLD_SIZE": str(nproc),
                        "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": port,
                    },
                )
                for r in range(nproc)
            ]
        results = _run_all(commands)
        if all(rc == 0 for rc, _ in results):
            shutil.rmtree(backup, ignore_errors=True)
            return results[0][1]
        log = "\n".join(text for _, text in results)
        # A real failure fails every attempt the same way; only the ranks not meeting is worth a retry.
        if attempt + 1 == ATTEMPTS or not any(trouble in log.lower() for trouble in PORT_TROUBLE):
            pytest.fail(f"launch {attempt + 1} failed:\n{log}")
        shutil.rmtree(out, ignore_errors=True)  # back to the folder as it was before this launch
        if backup.exists():
            shutil.copytree(backup, out)


def _run_all(commands: list[tuple[list[str], dict]]) -> list[tuple[int, str]]:
    """Start every command, wait for all (TIMEOUT), kill every one still running on the way out.
    Returns (exit code, stdout + stderr) per command."""
    procs = [
        subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        for cmd, env in commands
    ]
    try:
        deadline = time.monotonic() + TIMEOUT
        outputs = []
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"a launch ran past {TIMEOUT} s: {' '.join(p.args)}")
        return [(p.returncode, text) for p, text in zip(procs, outputs)]
    finally:
        for p in procs:  # torchrun's workers are in its session: kill the whole group
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _curves(out: Path) -> tuple[list[float], list[float]]:
    records = read_metrics(out / "metrics.jsonl")
    train = [r["loss"] for r in records if r.get("kind") is None]
    val = [r["val_loss"] for r in records if r.get("kind") == "val"]
    return train, val


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory) -> tuple[list[float], list[float]]:
    from tegaki.cli import main

    out = tmp_path_factory.mktemp("single") / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(shards),
                "--out",
                str(out),
                "--max-steps",
                "4",
                "--batch-size",
                "8",
                "--dtype",
                "fp32",
                "--device",
                "cpu",
                "--eval-every",
                "2",
                "--eval-batches",
                "2",
                "--save-every",
                "2",
                "--no-progress",
                "--sample-every",
                "0",
                *MODEL,
            ]
        )
        == 0
    )
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
