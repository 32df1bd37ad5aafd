"""Batches of (B, T+1) token windows from a prepared dataset (prep.reader.Dataset).

A shard of n tokens holds (n - 1) // T windows: window i is tokens [i*T, i*T + T] (inputs plus shifted targets),
so at most T tokens per shard go unused. Each epoch visits every train window once in an order drawn from
(seed, epoch); each micro step takes world_size * B consecutive windows of that order and rank r reads the r-th
block of B, so ranks never share a window. The state is just (epoch, windows consumed): cheap to checkpoint.
"""
from __future__ import annotations

import numpy as np
import torch

from prep.reader import Dataset, DatasetError


def window_counts(dataset: Dataset, split: str, seq_len: int) -> list[int]:
    return [max(0, (s.tokens - 1) // seq_len) for s in dataset.split(split)]


class WindowIndex:
    """Global window number -> (shard array, start token) across the shards of one split."""

    def __init__(self, dataset: Dataset, split: str, seq_len: int):
        self.arrays = dataset.arrays(split)
        self.seq_len = seq_len
        counts = window_counts(dataset, split, seq_len)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(self.offsets[-1])

    def batch(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        shard = np.searchsorted(self.offsets, windows, side="right") - 1
        starts = (windows - self.offsets[shard]) * self.seq_len
        rows = np.stack([self.arrays[s][st: st + self.seq_len + 1] for s, st in zip(shard, starts)])
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


class TrainLoader:
    def __init__(self, dataset: Dataset, micro_batch: int, seq_len: int, rank: int, world_size: int, seed: int):
        self.index = WindowIndex(dataset, "train", seq_len)
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        self.per_step = micro_batch * world_size
        if self.index.total < self.per_step:
            raise DatasetError(
                f"{dataset.path}: the train split holds {self.index.total} windows of {seq_len + 1} tokens, fewer than "
                f"one micro step needs (micro_batch {micro_batch} x world_size {world_size})")
        self.epoch, self.position = 0, 0
        self._order = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.index.total)
        return self._order

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index.batch(self.next_windows())

    def next_windows(self) -> np.ndarray:
        """This rank's window numbers for the next micro step.

        The tail of an epoch shorter than one micro step is skipped: every rank must get a full batch.
        """
        if self.position + self.per_step > self.index.total:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        start = self.position + self.rank * self.micro_batch
        windows = self._epoch_order()[start: start + self.micro_batch]
        self.position += self.per_step
        return windows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "windows": self.index.total}

    def load_state_dict(self, state: dict) -> None:
        if state["windows"] != self.index.total or state["seed"] != self.seed:
            raise DatasetError(
                f"loader state does not match this dataset/seed ({state['windows']} windows, seed {state['seed']} in "
                f"the checkpoint; {self.index.total} windows, seed {self.seed} now)")
        self.epoch, self.position, self._order = state["epoch"], state["position"], None


def val_batches(dataset: Dataset, micro_batch: int, seq_len: int, rank: int, world_size: int,
                n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same val windows at every evaluation: the first n_batches * world_size * B in file order, split by rank."""
    index = WindowIndex(dataset, "val", seq_len)
    per_batch = micro_batch * world_size
    n = min(n_batches, index.total // per_batch)
    if n == 0:
        raise DatasetError(f"{dataset.path}: the val split holds {index.total} windows of {seq_len + 1} tokens, "
                           f"fewer than one batch (micro_batch {micro_batch} x world_size {world_size})")
    return [index.batch(np.arange(i * per_batch + rank * micro_batch, i * per_batch + (rank + 1) * micro_batch))
            for i in range(n)]
