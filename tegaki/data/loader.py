"""Token shards -> batches: windows of block_size + 1 tokens, in a shuffled order whose position is
two integers (saved in every checkpoint, so a resumed run reads exactly the batches it would have).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tegaki.data.shards import load_meta, read_shard
from tegaki.errors import TegakiError

if TYPE_CHECKING:  # torch is imported when a batch is made: `tegaki prepare` runs without it
    import torch


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

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
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
