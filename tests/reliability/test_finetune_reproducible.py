"""A fine-tune is reproducible (issue 26, case 10): the same command gives bit-identical losses and
weights, LoRA as full fine-tuning, whatever state torch's generator was left in before it; and a run
killed mid-way resumes to the same bits (scripts/chaos.sh does it with a real kill -9)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from finetune_models import make_run, write_records
from reliability_helpers import cli

import tegaki.checkpoint
import tegaki.device
from tegaki.checkpoint import read_metrics


class Killed(BaseException):
    """Stands for kill -9: no `except Exception` stops it."""


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r.get("kind") is None]


def weights(run: Path) -> str:
    return hashlib.sha256((run / "checkpoints" / "step_000006" / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inputs")
    return make_run(root / "base", preset="tiny-llama"), write_records(root / "r.jsonl")


def finetune(inputs, out: Path, method: str, seed_before: int) -> int:
    base, data = inputs
    torch.manual_seed(seed_before)  # what earlier work in the process left in torch's generator
    tegaki.device._MEASURED.clear()  # as in a new process: the peak FLOP/s is measured again
    args = ["finetune", "--model", str(base), "--data", str(data), "--out", str(out), "--method", method]
    args += ["--max-steps", "6", "--save-every", "2", "--eval-every", "3", "--max-seq-len", "48"]
    args += ["--batch-size", "2", "--lora-targets", "all", "--lora-dropout", "0.1", "--lr", "0.01"]
    rc, err = cli([*args, "--device", "cpu", "--dtype", "fp32", "--no-progress"])
    assert rc == 0, err
    return rc


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_same_fine_tune_twice_and_after_a_kill_is_bit_identical(inputs, tmp_path, monkeypatch, method):
    finetune(inputs, tmp_path / "first", method, seed_before=1)
    finetune(inputs, tmp_path / "again", method, seed_before=2)
    assert len(losses(tmp_path / "first")) == 6
    assert losses(tmp_path / "again") == losses(tmp_path / "first")
    assert weights(tmp_path / "again") == weights(tmp_path / "first")

    real_write = tegaki.checkpoint.MetricsLog.write

    def killed_at_step_5(self, record):
        if record.get("step") == 5:
            raise Killed
        real_write(self, record)

    monkeypatch.setattr(tegaki.checkpoint.MetricsLog, "write", killed_at_step_5)
    with pytest.raises(Killed):
        finetune(inputs, tmp_path / "killed", method, seed_before=3)
    monkeypatch.undo()
    assert [step for step, _ in losses(tmp_path / "killed")] == [1, 2, 3, 4]
    finetune(inputs, tmp_path / "killed", method, seed_before=4)  # resumes from step 4
    assert losses(tmp_path / "killed") == losses(tmp_path / "first")
    assert weights(tmp_path / "killed") == weights(tmp_path / "first")
