"""What a training run shows a person besides its files: the progress bar, TensorBoard, and
out-of-memory advice."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tegaki.errors import TegakiError
from tegaki.train.settings import TrainConfig


@contextlib.contextmanager
def explain_out_of_memory(cfg: TrainConfig, device: torch.device):
    """A batch that does not fit in memory is a setting to change, not a crash to debug."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise TegakiError(
            f"a batch of {cfg.batch_size} x {cfg.block_size or 'block_size'} tokens does not fit in {device} "
            "memory; "
            f"lower --batch-size (and raise --grad-accum to keep the tokens per step) or --block-size"
        ) from None


def progress_bar(total: int, initial: int, enabled: bool):
    """The step counter on the terminal (off for --no-progress and for every rank but the first)."""
    return tqdm(total=total, initial=initial, unit="step", desc="train", disable=not enabled, dynamic_ncols=True)


def tensorboard_writer(run_dir: Path):
    """A TensorBoard writer into RUN/tb when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: metrics.jsonl and loss.png are enough
        return None
    return SummaryWriter(str(run_dir / "tb"))
