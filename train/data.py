"""Batches of (B, T+1) token windows from a prepared dataset (prep.reader.Dataset), read ahead in the background.

A shard of n tokens holds (n - 1) // T windows: window i is tokens [i*T, i*T + T] (inputs plus shifted targets),
so at most T tokens per shard go unused. Each epoch visits every train window once in an order drawn from
(seed, epoch); each micro step takes world_size * B consecutive positions of that order and rank r reads the r-th
block of B, so ranks never share a window. The order is a keyed permutation computed position by position
(FeistelOrder), so it costs no memory and no start-up whatever the dataset's size. The state is just
(epoch, windows consumed): cheap to checkpoint, and independent of the world size.

Reading: a few threads read the next micro batches (pread releases the GIL) while the model computes; batches
come back strictly in order, so prefetching changes no batch. Every batch is checked against the vocabulary
before it is handed out.
"""
from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from prep.reader import Dataset, DatasetError, ShardFile
from prep.shard import HEADER_BYTES, TOKEN_DTYPE

# Micro batches asked for ahead of the one being used, and the threads reading them (8 x 16 x 1025 tokens is about
# 1 MiB). Two threads keep two cold reads in flight, so a slow read (milliseconds on a network filesystem) does not
# hold up the next batch, while few threads leave the training thread the GIL: with 8 ranks on 2 cores, 4 threads
# measured a higher data wait than 2 (docs/benchmarks.md). Reads are strictly in order either way.
PREFETCH = 8
READ_THREADS = 2
ORDER_CHUNK = 64  # micro steps whose windows are computed at once


class TokenIdError(DatasetError):
    """A token id outside the dataset's vocabulary: a damaged shard or one made by another tokenizer."""


def window_counts(dataset: Dataset, split: str, seq_len: int) -> list[int]:
    return [max(0, (s.tokens - 1) // seq_len) for s in dataset.split(split)]


class WindowIndex:
    """Global window number -> (shard, start token) across the shards of one split; reads and checks windows."""

    def __init__(self, dataset: Dataset, split: str, seq_len: int):
        self.files: list[ShardFile] = dataset.files(split)
        self.seq_len, self.n_vocab = seq_len, dataset.n_vocab
        counts = window_counts(dataset, split, seq_len)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(self.offsets[-1])

    def read(self, windows: np.ndarray, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the given windows as int64 tensors, in pinned memory when `pin`."""
        shard = np.searchsorted(self.offsets, windows, side="right") - 1
        starts = (windows - self.offsets[shard]) * self.seq_len
        rows = np.empty((len(windows), self.seq_len + 1), dtype=TOKEN_DTYPE)
        for row, s, start in zip(rows, shard, starts):
            self.files[s].read_into(int(start), row)
        if rows.size and int(rows.max()) >= self.n_vocab:  # ~10 us for 16 x 1025 tokens (docs/train.md)
            self._refuse(rows, shard, starts)
        x = torch.empty((len(windows), self.seq_len), dtype=torch.int64, pin_memory=pin)
        y = torch.empty((len(windows), self.seq_len), dtype=torch.int64, pin_memory=pin)
        np.copyto(x.numpy(), rows[:, :-1])
        np.copyto(y.numpy(), rows[:, 1:])
        return x, y

    def _refuse(self, rows: np.ndarray, shard: np.ndarray, starts: np.ndarray):
        row, col = np.unravel_index(int(np.argmax(rows >= self.n_vocab)), rows.shape)
        file, position = self.files[shard[row]], int(starts[row]) + int(col)
        raise TokenIdError(
            f"{file.path}: token {position:,} (byte {HEADER_BYTES + 2 * position:,}) is id {int(rows[row, col])}, "
            f"outside the vocabulary (n_vocab {self.n_vocab}); the shard is damaged or was made with another "
            f"tokenizer (python -m prep verify {file.path.parent} checks every token); stopped before training on it")


class FeistelOrder:
    """A keyed pseudo-random permutation of range(n), evaluated per position in O(1) memory.

    A balanced Feistel network over 2k-bit numbers (2^2k >= n, so the domain is below 4n) is a bijection whatever
    its round function; positions that land at or above n are encrypted again (cycle walking) until they fall
    inside, which keeps it a bijection of range(n) and takes under 4 rounds of the network on average.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.SeedSequence([seed, epoch]).generate_state(self.ROUNDS, dtype=np.uint64)

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        # splitmix64's finaliser of (right ^ key): every output bit depends on every input bit.
        z = (right ^ key) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self.half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        out = self._encrypt(np.asarray(positions, dtype=np.uint64))
        outside = out >= self.n
        while outside.any():
            out[outside] = self._encrypt(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


class PermutationOrder:
    """numpy's permutation of every window, held in memory (8 bytes a window): the order of checkpoints written
    before the loader recorded its order, kept so that those runs resume exactly where they were."""

    def __init__(self, n: int, seed: int, epoch: int):
        self.permutation = np.random.default_rng([seed, epoch]).permutation(n)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        return self.permutation[positions]


ORDERS = {"feistel": FeistelOrder, "permutation": PermutationOrder}


class TrainLoader:
    """This rank's micro batches, in order; `next()` returns (inputs, targets) on `device`.

    With prefetch > 0, READ_THREADS threads read up to `prefetch` batches ahead into pinned memory (on CUDA), and
    next() starts a non-blocking copy to the GPU. state_dict() describes the batches handed out, never the ones
    read ahead, so a checkpoint resumes at the next batch the model has not seen. close() cancels what is queued
    and lets the threads end after the read in hand; a loader never closed only delays the process's exit by the
    batches already asked for (at most `prefetch` reads).
    """

    def __init__(self, dataset: Dataset, micro_batch: int, seq_len: int, rank: int, world_size: int, seed: int,
                 device: str = "cpu", prefetch: int = PREFETCH):
        self.index = WindowIndex(dataset, "train", seq_len)
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        self.per_step = micro_batch * world_size
        if self.index.total < self.per_step:
            raise DatasetError(
                f"{dataset.path}: the train split holds {self.index.total} windows of {seq_len + 1} tokens, fewer than "
                f"one micro step needs (micro_batch {micro_batch} x world_size {world_size})")
        self.device, self.prefetch = device, prefetch
        self.pin = device.startswith("cuda")
        self.order_name = "feistel"
        self.epoch, self.position = 0, 0
        self._order = None  # (order name, epoch, order) of the last epoch asked for
        self._windows = {}  # (order name, epoch, position) -> this rank's windows, for the next few micro steps
        self._pool = None
        self._pending = collections.deque()  # (future batch, cursor after it), oldest first
        self._ahead = None  # cursor after the last batch asked for

    # ---- the order ----------------------------------------------------------------------------------------------
    def _order_for(self, epoch: int):
        if self._order is None or self._order[:2] != (self.order_name, epoch):
            self._order = (self.order_name, epoch, ORDERS[self.order_name](self.index.total, self.seed, epoch))
        return self._order[2]

    def _windows_after(self, cursor: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        """This rank's windows for the micro step at `cursor` (epoch, position), and the cursor after it.

        The tail of an epoch shorter than one micro step is skipped: every rank must get a full batch.
        """
        epoch, position = cursor
        if position + self.per_step > self.index.total:
            epoch, position = epoch + 1, 0
        if (self.order_name, epoch, position) not in self._windows:
            self._windows = self._order_chunk(epoch, position)
        return self._windows[self.order_name, epoch, position], (epoch, position + self.per_step)

    def _order_chunk(self, epoch: int, position: int) -> dict:
        """This rank's windows for the next ORDER_CHUNK micro steps of the epoch, evaluated in one call: the
        permutation costs about as much for 1,024 positions as for 16 (numpy's per-call overhead dominates)."""
        steps = min(ORDER_CHUNK, (self.index.total - position) // self.per_step)
        starts = position + np.arange(steps) * self.per_step + self.rank * self.micro_batch
        windows = self._order_for(epoch)((starts[:, None] + np.arange(self.micro_batch)).ravel())
        windows = windows.reshape(steps, self.micro_batch)
        return {(self.order_name, epoch, position + k * self.per_step): windows[k] for k in range(steps)}

    def next_windows(self) -> np.ndarray:
        """The window numbers of the next micro step, consumed without reading them (the order alone)."""
        self._drop_pending()
        windows, (self.epoch, self.position) = self._windows_after((self.epoch, self.position))
        return windows

    # ---- reading ------------------------------------------------------------------------------------------------
    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetch == 0:
            windows, cursor = self._windows_after((self.epoch, self.position))
            x, y = self.index.read(windows, self.pin)
        else:
            if not self._pending:
                self._fill()
            future, cursor = self._pending.popleft()
            x, y = future.result()  # a reader's error (a bad token id, a short read) is raised here, in order
            # Refilled after the result: a reader woken by the new request would compete for the GIL first.
            self._fill()
        self.epoch, self.position = cursor
        if self.device == "cpu":
            return x, y
        return x.to(self.device, non_blocking=self.pin), y.to(self.device, non_blocking=self.pin)

    def _fill(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="train-loader")
        if self._ahead is None:
            self._ahead = (self.epoch, self.position)
        while len(self._pending) < self.prefetch:
            windows, self._ahead = self._windows_after(self._ahead)
            self._pending.append((self._pool.submit(self.index.read, windows, self.pin), self._ahead))

    def _drop_pending(self) -> None:
        for future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._ahead = None

    def close(self) -> None:
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ---- checkpoint state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "windows": self.index.total,
                "order": self.order_name}

    def load_state_dict(self, state: dict) -> None:
        if state["windows"] != self.index.total or state["seed"] != self.seed:
            raise DatasetError(
                f"loader state does not match this dataset/seed ({state['windows']} windows, seed {state['seed']} in "
                f"the checkpoint; {self.index.total} windows, seed {self.seed} now)")
        # A state without "order" was written before the order was recorded, by a loader that used numpy's
        # permutation: that run goes on with it, so its epochs stay exact.
        order = state.get("order", "permutation")
        if order not in ORDERS:
            raise DatasetError(f"loader state names the window order {order!r}, which this version does not know "
                               f"(known: {', '.join(ORDERS)}); resume with the version that wrote the checkpoint")
        self._drop_pending()
        self.order_name, self.epoch, self.position = order, state["epoch"], state["position"]


def val_batches(dataset: Dataset, micro_batch: int, seq_len: int, rank: int, world_size: int,
                n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same val windows at every evaluation: the first n_batches * world_size * B in file order, split by rank."""
    index = WindowIndex(dataset, "val", seq_len)
    per_batch = micro_batch * world_size
    n = min(n_batches, index.total // per_batch)
    if n == 0:
        raise DatasetError(f"{dataset.path}: the val split holds {index.total} windows of {seq_len + 1} tokens, "
                           f"fewer than one batch (micro_batch {micro_batch} x world_size {world_size})")
    return [index.read(np.arange(i * per_batch + rank * micro_batch, i * per_batch + (rank + 1) * micro_batch))
            for i in range(n)]
