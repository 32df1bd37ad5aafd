"""Batches of (B, T+1) token windows from one prepared dataset or a weighted mixture of them, read ahead in the
background.

A shard of n tokens holds (n - 1) // T windows: window i is tokens [i*T, i*T + T] (inputs plus shifted targets),
so at most T tokens per shard go unused. Each epoch visits every train window once in an order drawn from
(seed, epoch); each micro step takes world_size * B consecutive positions of that order and rank r reads the r-th
block of B, so ranks never share a window. The order is a keyed permutation computed position by position
(FeistelOrder), so it costs no memory and no start-up whatever the dataset's size. The state is just
(epoch, windows consumed): cheap to checkpoint, and independent of the world size.

A mixture (MixLoader) numbers its draws globally: the world_size * B windows of a micro step are draws
[d, d + world_size * B), rank r takes the r-th block of B, and each draw goes to the dataset whose count lags its
weight most (Interleave); the j-th draw of dataset i is position j % n_i of its epoch j // n_i, in its own keyed
order. The state is each dataset's draw count, again independent of the world size.

Reading: a few threads read the next micro batches (pread releases the GIL) while the model computes; batches
come back strictly in order, so prefetching changes no batch. Every batch is checked against the vocabulary
before it is handed out.
"""
from __future__ import annotations

import collections
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from prep.reader import Dataset, DatasetError, ShardFile
from prep.shard import HEADER_BYTES, TOKEN_DTYPE

from .section import REQUIRED, RecipeError, is_number, shown, string

if TYPE_CHECKING:
    import torch

# A dataset's name becomes a metrics key (val_loss/NAME) and a TensorBoard tag.
DATASET_NAME = re.compile(r"[A-Za-z0-9._-]+")
# The finest share a mixture interleaves (Interleave.RESOLUTION).
MIX_RESOLUTION = 65536
# Interleave's start-up computes one period of draws, resolution x datasets steps in Python: 64 datasets at the
# finest resolution is 4M steps, seconds; far more datasets would stall start-up for minutes.
MAX_MIX = 64


@dataclass(frozen=True)
class MixEntry:
    dir: str = REQUIRED
    weight: float = REQUIRED  # relative: the weights of a mix are normalised to sum to 1
    name: str | None = None  # in metrics (val_loss/NAME) and the loader state; default: the directory's name


@dataclass(frozen=True)
class Data:
    """The recipe's data section: exactly one of dir (one prepared dataset) and mix (several, each drawn at its
    weight; docs/train.md, Mixtures)."""
    dir: str | None = None
    mix: tuple = field(default=(), metadata={"items": MixEntry})

    def entries(self) -> list[tuple[str, str, float]]:
        """(name, directory, weight as written) of each dataset the run reads."""
        if not self.mix:
            return [(Path(self.dir).name, self.dir, 1)]
        return [(e.name if e.name is not None else Path(e.dir).name, e.dir, e.weight) for e in self.mix]

    def check(self) -> None:
        if (self.dir is None) == (not self.mix):
            both = ("; both are set (a recipe file's data.dir is cleared with --set data.dir=null)"
                    if self.dir is not None else "")
            raise RecipeError(f"give exactly one of data.dir (one dataset) and data.mix (several, with weights){both}")
        if self.dir is not None:
            string("data.dir", self.dir, nonempty=True)
            return
        if len(self.mix) < 2:
            raise RecipeError("data.mix lists one dataset; a mixture needs two or more (one dataset is data.dir)")
        if len(self.mix) > MAX_MIX:
            raise RecipeError(f"data.mix lists {len(self.mix)} datasets; at most {MAX_MIX} are supported")
        names, dirs = {}, {}
        for i, entry in enumerate(self.mix):
            where = f"data.mix[{i}]"
            if entry.dir == REQUIRED or not isinstance(entry.dir, str) or not entry.dir:
                raise RecipeError(f"{where}.dir is required: the directory of a prepared dataset, got "
                                  f"{shown(entry.dir)}")
            weight = entry.weight
            if weight == REQUIRED:
                raise RecipeError(f"{where}.weight is required (a positive number; the weights are normalised)")
            if not is_number(weight) or weight <= 0:
                raise RecipeError(f"{where}.weight must be a positive number, got {shown(weight)}")
            name = entry.name if entry.name is not None else Path(entry.dir).name
            if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
                raise RecipeError(f"{where}: the name {shown(name)} is not letters, digits, '.', '_' or '-'; "
                                  f"set {where}.name")
            if name in names:
                raise RecipeError(f"{where}: the name {name!r} is data.mix[{names[name]}]'s too; set {where}.name")
            resolved = Path(entry.dir).resolve()
            if resolved in dirs:
                raise RecipeError(f"{where}.dir {entry.dir} is data.mix[{dirs[resolved]}]'s too; list each dataset "
                                  f"once, with the weights added")
            names[name], dirs[resolved] = i, i
        # Summed relative to the largest weight: a sum of weights near the float maximum would be inf.
        largest = max(e.weight for e in self.mix)
        relative = sum(e.weight / largest for e in self.mix)
        total = relative * largest
        for i, entry in enumerate(self.mix):
            if entry.weight / largest < relative / MIX_RESOLUTION:
                raise RecipeError(f"data.mix[{i}].weight {entry.weight} is below 1/{MIX_RESOLUTION:,} of the total "
                                  f"({total}), finer than the interleaving resolves")

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


def as_tensors(rows: np.ndarray, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) uint16 windows -> (inputs, targets) as int64 tensors, in pinned memory when `pin`."""
    import torch
    n, t = rows.shape[0], rows.shape[1] - 1
    x = torch.empty((n, t), dtype=torch.int64, pin_memory=pin)
    y = torch.empty((n, t), dtype=torch.int64, pin_memory=pin)
    np.copyto(x.numpy(), rows[:, :-1])
    np.copyto(y.numpy(), rows[:, 1:])
    return x, y


class WindowIndex:
    """Global window number -> (shard, start token) across the shards of one split; reads and checks windows."""

    def __init__(self, dataset: Dataset, split: str, seq_len: int):
        self.files: list[ShardFile] = dataset.files(split)
        self.seq_len, self.n_vocab = seq_len, dataset.n_vocab
        counts = window_counts(dataset, split, seq_len)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(self.offsets[-1])

    def rows(self, windows: np.ndarray) -> np.ndarray:
        """The given windows as (len(windows), T+1) uint16 rows, each token checked against the vocabulary."""
        shard = np.searchsorted(self.offsets, windows, side="right") - 1
        starts = (windows - self.offsets[shard]) * self.seq_len
        rows = np.empty((len(windows), self.seq_len + 1), dtype=TOKEN_DTYPE)
        for row, s, start in zip(rows, shard, starts):
            self.files[s].read_into(int(start), row)
        if rows.size and int(rows.max()) >= self.n_vocab:  # ~10 us for 16 x 1025 tokens (docs/train.md)
            self._refuse(rows, shard, starts)
        return rows

    def read(self, windows: np.ndarray, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the given windows as int64 tensors, in pinned memory when `pin`."""
        return as_tensors(self.rows(windows), pin)

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
    inside, which keeps it a bijection of range(n) and takes under 4 rounds of the network on average. `stream`
    keys one dataset of a mixture apart from the others (the single-dataset order has none).
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int, stream: int | None = None):
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        key = [seed, epoch] if stream is None else [seed, epoch, stream]
        self.keys = np.random.SeedSequence(key).generate_state(self.ROUNDS, dtype=np.uint64)

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


class _ReadAhead:
    """Hands out micro batches in order, READ_THREADS threads reading up to `prefetch` of them ahead.

    A subclass keeps its position as `cursor` and says what the micro step at a cursor reads (_plan: the plan and
    the cursor after it) and how to read a plan (_read, run in a reading thread). With prefetch > 0, batches are
    read into pinned memory (on CUDA) and next() starts a non-blocking copy to the GPU. state_dict() describes the
    batches handed out, never the ones read ahead, so a checkpoint resumes at the next batch the model has not
    seen. close() cancels what is queued and lets the threads end after the read in hand; a loader never closed
    only delays the process's exit by the batches already asked for (at most `prefetch` reads).
    """

    cursor: tuple

    def __init__(self, device: str, prefetch: int):
        self.device, self.prefetch = device, prefetch
        self.pin = device.startswith("cuda")
        self._pool = None
        self._pending = collections.deque()  # (future batch, cursor after it), oldest first
        self._ahead = None  # cursor after the last batch asked for

    def _plan(self, cursor: tuple):
        raise NotImplementedError

    def _read(self, plan, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def next_windows(self):
        """The plan of the next micro step (its windows), consumed without reading it (the order alone)."""
        self._drop_pending()
        plan, self.cursor = self._plan(self.cursor)
        return plan

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetch == 0:
            plan, cursor = self._plan(self.cursor)
            x, y = self._read(plan, self.pin)
        else:
            if not self._pending:
                self._fill()
            future, cursor = self._pending.popleft()
            x, y = future.result()  # a reader's error (a bad token id, a short read) is raised here, in order
            # Refilled after the result: a reader woken by the new request would compete for the GIL first.
            self._fill()
        self.cursor = cursor
        if self.device == "cpu":
            return x, y
        return x.to(self.device, non_blocking=self.pin), y.to(self.device, non_blocking=self.pin)

    def _fill(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="train-loader")
        if self._ahead is None:
            self._ahead = self.cursor
        while len(self._pending) < self.prefetch:
            plan, self._ahead = self._plan(self._ahead)
            self._pending.append((self._pool.submit(self._read, plan, self.pin), self._ahead))

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


class TrainLoader(_ReadAhead):
    """This rank's micro batches of one dataset, in order; `next()` returns (inputs, targets) on `device`."""

    def __init__(self, dataset: Dataset, micro_batch: int, seq_len: int, rank: int, world_size: int, seed: int,
                 device: str = "cpu", prefetch: int = PREFETCH):
        self.index = WindowIndex(dataset, "train", seq_len)
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        self.per_step = micro_batch * world_size
        if self.index.total < self.per_step:
            raise DatasetError(
                f"{dataset.path}: the train split holds {self.index.total} windows of {seq_len + 1} tokens, fewer than "
                f"one micro step needs (micro_batch {micro_batch} x world_size {world_size})")
        super().__init__(device, prefetch)
        self.epoch, self.position = 0, 0
        self._order = None  # (epoch, order) of the last epoch asked for
        self._windows = {}  # (epoch, position) -> this rank's windows, for the next few micro steps

    @property
    def cursor(self) -> tuple[int, int]:
        return self.epoch, self.position

    @cursor.setter
    def cursor(self, value: tuple[int, int]) -> None:
        self.epoch, self.position = value

    # ---- the order ----------------------------------------------------------------------------------------------
    def _order_for(self, epoch: int):
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, FeistelOrder(self.index.total, self.seed, epoch))
        return self._order[1]

    def _plan(self, cursor: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        """This rank's windows for the micro step at `cursor` (epoch, position), and the cursor after it.

        The tail of an epoch shorter than one micro step is skipped: every rank must get a full batch.
        """
        epoch, position = cursor
        if position + self.per_step > self.index.total:
            epoch, position = epoch + 1, 0
        if (epoch, position) not in self._windows:
            self._windows = self._order_chunk(epoch, position)
        return self._windows[epoch, position], (epoch, position + self.per_step)

    def _order_chunk(self, epoch: int, position: int) -> dict:
        """This rank's windows for the next ORDER_CHUNK micro steps of the epoch, evaluated in one call: the
        permutation costs about as much for 1,024 positions as for 16 (numpy's per-call overhead dominates)."""
        steps = min(ORDER_CHUNK, (self.index.total - position) // self.per_step)
        starts = position + np.arange(steps) * self.per_step + self.rank * self.micro_batch
        windows = self._order_for(epoch)((starts[:, None] + np.arange(self.micro_batch)).ravel())
        windows = windows.reshape(steps, self.micro_batch)
        return {(epoch, position + k * self.per_step): windows[k] for k in range(steps)}

    def _read(self, windows: np.ndarray, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index.read(windows, pin)

    def epochs(self, draws: int) -> float:
        """Epochs that `draws` windows (a whole run's) take; each epoch's tail shorter than a micro step is skipped."""
        return draws / (self.index.total // self.per_step * self.per_step)

    def describe(self, draws: int) -> list[tuple[str, str]]:
        """Start-up table rows: the epochs a run of `draws` windows takes."""
        return [("data epochs", f"{self.epochs(draws):.3g} of {self.index.total:,} windows")]

    # ---- checkpoint state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "windows": self.index.total,
                "order": "feistel"}

    def load_state_dict(self, state: dict) -> None:
        if "mix" in state:
            raise DatasetError(f"the checkpoint's loader drew from a mixture ({describe_mix(state)}), this recipe "
                               f"reads one dataset (data.dir); a run cannot switch between them: use a new run_dir")
        if state["windows"] != self.index.total or state["seed"] != self.seed:
            raise DatasetError(
                f"loader state does not match this dataset/seed ({state['windows']} windows, seed {state['seed']} in "
                f"the checkpoint; {self.index.total} windows, seed {self.seed} now)")
        if state.get("order") != "feistel":
            raise DatasetError(f"loader state names the window order {state.get('order')!r}, which this version does "
                               f"not read (only feistel): written by an earlier version: start a new run_dir")
        self._drop_pending()
        self.epoch, self.position = state["epoch"], state["position"]


# ---- mixtures -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One dataset of the training data: its name in metrics (val_loss/<name>), the dataset, and its weight as the
    recipe gives it (a mixture's shares are its weights normalised: Interleave.shares)."""
    name: str
    dataset: Dataset
    weight: float


def tokenizer_of(dataset: Dataset) -> tuple:
    tok = dataset.manifest.get("tokenizer") or {}
    return tok.get("name"), dataset.n_vocab, dataset.eot


def open_sources(entries: list[tuple[str, str, float]]) -> list[Source]:
    """(name, directory, weight) of each dataset -> opened Sources; the datasets of a mixture must share one
    tokenizer (manifest name, n_vocab, eot), or their token ids would mean different things."""
    sources = [Source(name, Dataset(path), weight) for name, path, weight in entries]
    first = sources[0]
    for other in sources[1:]:
        if tokenizer_of(other.dataset) != tokenizer_of(first.dataset):
            def told(s):
                name, n_vocab, eot = tokenizer_of(s.dataset)
                return f"{s.dataset.path} has {name} (n_vocab {n_vocab}, eot {eot})"
            raise DatasetError(f"data.mix: the datasets were tokenized differently: {told(first)}, {told(other)}; "
                               f"a mixture needs one tokenizer: prepare them all with the same one")
    return sources


class Interleave:
    """Which dataset each draw of a mixture goes to: the one whose count lags its weight x draws most.

    The weights become integers W_i with sum Q (exactly the weights as written when Q <= RESOLUTION: 0.7 / 0.3 is
    7 / 3; otherwise rounded to RESOLUTION by largest remainder). With counts k_i after m draws, draw m + 1 goes to
    argmax_i (W_i (m + 1) - Q k_i), the first such i on a tie. The dataset drawn has the largest lag-plus-share
    e_i + w_i (e_i = w_i m - k_i, w_i = W_i / Q), and those sum to 1, so it is at least 1/n for n datasets and no
    lag ever goes below -(1 - 1/n) (for two datasets, whose lags are opposite, |e_i| <= 1/2). After Q draws every
    lag is an integer, so at least 0, and the lags sum to 0, so all are 0 again: the sequence repeats with period
    Q, and one period (computed once at start-up: 0.07 s for two datasets at the finest resolution) gives the
    dataset of any draw and the counts before it by arithmetic, for any rank, world size or resume point.

    Unlike independent random draws, whose count after m draws is off by about sqrt(m w (1 - w)) windows, the
    count of each dataset over any span of draws stays within span_error() windows of its share x span (exact:
    the lags repeat with the period, so one period holds every value they take): at most 1 for two datasets (the
    bound above), at most 1.92 measured over 280 random 3-decimal weightings of 2, 3, 4, 5, 8, 12 and 16 datasets, so
    SPAN_TOLERANCE is 2 windows (tests/test_train_mix.py checks it over 1,000 steps of several mixtures).
    """

    RESOLUTION = MIX_RESOLUTION
    SPAN_TOLERANCE = 2.0

    def __init__(self, weights: list[float]):
        self.units = integer_weights(weights, self.RESOLUTION)
        self.period = sum(self.units)
        n, q, units = len(self.units), self.period, self.units
        choices, counts = np.empty(q, dtype=np.int64), [0] * n
        for m in range(q):
            best = max(range(n), key=lambda d: units[d] * (m + 1) - q * counts[d])
            counts[best] += 1
            choices[m] = best
        self.choices = choices
        self.prefix = np.zeros((q + 1, n), dtype=np.int64)  # counts among the first r draws of a period
        np.cumsum(np.eye(n, dtype=np.int64)[choices], axis=0, out=self.prefix[1:])
        self.units_array = np.asarray(units, dtype=np.int64)

    @property
    def shares(self) -> list[float]:
        return [u / self.period for u in self.units]

    def span_error(self) -> float:
        """The largest difference, over every span of draws and every dataset, between its count and share x span."""
        m = np.arange(self.period + 1)
        lag = m[:, None] * self.units_array / self.period - self.prefix
        return float((lag.max(axis=0) - lag.min(axis=0)).max())

    def dataset(self, draws: np.ndarray) -> np.ndarray:
        """The dataset of each 0-based draw number."""
        return self.choices[np.asarray(draws) % self.period]

    def counts(self, draws: np.ndarray) -> np.ndarray:
        """(..., n) draws of each dataset among the first `draws` draws."""
        whole, part = np.divmod(np.asarray(draws, dtype=np.int64), self.period)
        return whole[..., None] * self.units_array + self.prefix[part]


def integer_weights(weights: list[float], resolution: int) -> list[int]:
    """Positive weights -> the smallest integers in their ratio, read as written (0.7 is 7/10, not the nearest
    double); rounded to a total of `resolution` by largest remainder when their exact total would exceed it."""
    exact = [Fraction(str(w)) if isinstance(w, float) else Fraction(w) for w in weights]
    shares = [w / sum(exact) for w in exact]
    period = math.lcm(*(s.denominator for s in shares))
    if period <= resolution:
        return [int(s * period) for s in shares]
    scaled = [s * resolution for s in shares]
    units = [math.floor(s) for s in scaled]
    by_remainder = sorted(range(len(units)), key=lambda i: scaled[i] - units[i], reverse=True)
    for i in by_remainder[:resolution - sum(units)]:
        units[i] += 1
    if min(units) == 0:
        raise DatasetError(f"data.mix: a weight below 1/{resolution:,} of the total cannot be interleaved")
    divisor = math.gcd(*units)
    return [u // divisor for u in units]


def describe_mix(state: dict) -> str:
    return ", ".join(f"{d['name']} ({d['windows']} windows, weight {d['weight']:.4g})" for d in state["mix"])


class MixLoader(_ReadAhead):
    """This rank's micro batches of a weighted mixture of datasets; `next()` returns (inputs, targets).

    cursor: each dataset's draws so far (since the run's start); its epoch is draws // windows. base: the cursor
    where the current weights took effect (zeros unless a resume changed the weights), from which Interleave
    counts, so new weights do not make the newly favoured dataset catch up on the past. Micro step s after base
    holds draws [s x world_size x B, (s + 1) x world_size x B) and rank r takes the r-th block of B of them.
    """

    def __init__(self, sources: list[Source], micro_batch: int, seq_len: int, rank: int, world_size: int, seed: int,
                 device: str = "cpu", prefetch: int = PREFETCH):
        self.sources = sources
        self.indexes = [WindowIndex(s.dataset, "train", seq_len) for s in sources]
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        self.per_step = micro_batch * world_size
        for source, index in zip(sources, self.indexes):
            # Fewer windows than one micro step's draws could put one window on two ranks in the same step.
            if index.total < self.per_step:
                raise DatasetError(
                    f"{source.dataset.path}: the train split holds {index.total} windows of {seq_len + 1} tokens, "
                    f"fewer than one micro step draws (micro_batch {micro_batch} x world_size {world_size})")
        super().__init__(device, prefetch)
        self.interleave = Interleave([s.weight for s in sources])
        self.totals = np.array([index.total for index in self.indexes], dtype=np.int64)
        self.cursor = self.base = (0,) * len(sources)
        self._orders = {}  # dataset -> (epoch, its FeistelOrder) of the last epoch asked for
        self._chunk = {}  # cursor -> (plan, cursor after it), for the next few micro steps

    def _order(self, d: int, epoch: int) -> FeistelOrder:
        if self._orders.get(d, (None,))[0] != epoch:
            self._orders[d] = (epoch, FeistelOrder(int(self.totals[d]), self.seed, epoch, stream=d))
        return self._orders[d][1]

    def _plan(self, cursor: tuple) -> tuple[tuple[np.ndarray, np.ndarray], tuple]:
        """(datasets, windows) of this rank's B draws in the micro step at `cursor`, and the cursor after it."""
        if cursor not in self._chunk:
            self._chunk = self._plan_chunk(cursor)
        return self._chunk[cursor]

    def _plan_chunk(self, cursor: tuple) -> dict:
        """The next ORDER_CHUNK micro steps from `cursor`, each order evaluated once per (dataset, epoch)."""
        base = np.asarray(self.base, dtype=np.int64)
        done = int(np.sum(np.asarray(cursor) - base))  # draws since base
        steps = np.arange(ORDER_CHUNK)
        draws = (done + steps * self.per_step + self.rank * self.micro_batch)[:, None] + np.arange(self.micro_batch)
        datasets = self.interleave.dataset(draws)
        # Each draw's number within its dataset, from the run's start: the draws of that dataset before it.
        before = np.take_along_axis(self.interleave.counts(draws), datasets[..., None], axis=-1)[..., 0]
        numbers = base[datasets] + before
        epochs, positions = np.divmod(numbers, self.totals[datasets])
        windows = np.empty_like(numbers)
        for d, epoch in sorted(set(zip(datasets.ravel().tolist(), epochs.ravel().tolist()))):
            here = (datasets == d) & (epochs == epoch)
            windows[here] = self._order(d, epoch)(positions[here])
        edges = base + self.interleave.counts(done + np.arange(ORDER_CHUNK + 1) * self.per_step)
        cursors = [tuple(int(v) for v in row) for row in edges]
        return {cursors[k]: ((datasets[k], windows[k]), cursors[k + 1]) for k in steps}

    def _read(self, plan: tuple[np.ndarray, np.ndarray], pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
        datasets, windows = plan
        rows = np.empty((len(windows), self.indexes[0].seq_len + 1), dtype=TOKEN_DTYPE)
        for d in np.unique(datasets):
            mask = datasets == d
            rows[mask] = self.indexes[d].rows(windows[mask])
        return as_tensors(rows, pin)

    @property
    def shares(self) -> list[float]:
        return self.interleave.shares

    def epochs(self, draws: int) -> list[float]:
        """Epochs of each dataset that `draws` windows (a whole run's) take at the mixture's shares."""
        return [share * draws / int(total) for share, total in zip(self.interleave.shares, self.totals)]

    def describe(self, draws: int) -> list[tuple[str, str]]:
        """Start-up table rows: each dataset's share, and the epochs of it a run of `draws` windows takes."""
        rows = [(f"data {s.name}", f"share {share:.4g}, {epochs:.3g} epochs of {int(total):,} windows")
                for s, share, epochs, total in zip(self.sources, self.interleave.shares, self.epochs(draws),
                                                   self.totals)]
        return rows + [("data mix tolerance", f"each dataset's windows over any span of draws are within "
                                              f"{self.interleave.span_error():.2f} of share x span")]

    # ---- checkpoint state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "order": "feistel",
                "mix": [{"name": s.name, "windows": int(total), "weight": s.weight, "drawn": c, "base": b}
                        for s, total, c, b in zip(self.sources, self.totals, self.cursor, self.base)]}

    def load_state_dict(self, state: dict) -> None:
        now = self.state_dict()
        if "mix" not in state:
            raise DatasetError(f"the checkpoint's loader read one dataset ({state.get('windows')} windows), this "
                               f"recipe mixes {describe_mix(now)}; a run cannot switch between data.dir and "
                               f"data.mix: use a new run_dir")
        if ([(d["name"], d["windows"]) for d in state["mix"]] != [(d["name"], d["windows"]) for d in now["mix"]]
                or state["seed"] != self.seed or state.get("order") != "feistel"):
            raise DatasetError(f"loader state does not match this mixture/seed (the checkpoint drew from "
                               f"{describe_mix(state)} with seed {state['seed']}; this recipe: {describe_mix(now)} "
                               f"with seed {self.seed}); only the weights may change on resume")
        drawn = tuple(int(d["drawn"]) for d in state["mix"])
        base = tuple(int(d["base"]) for d in state["mix"])
        if [d["weight"] for d in state["mix"]] == [s.weight for s in self.sources]:
            since = np.asarray(drawn) - np.asarray(base)
            if not np.array_equal(self.interleave.counts(int(since.sum())), since):
                raise DatasetError(f"loader state: the draws {list(drawn)} are not what the interleaving of "
                                   f"{describe_mix(now)} gives; the checkpoint was written by another version")
        else:
            base = drawn  # new weights count from here, so every span after the resume follows them
        self._drop_pending()
        self._chunk = {}
        self.cursor, self.base = drawn, base


def train_loader(sources: list[Source], micro_batch: int, seq_len: int, rank: int, world_size: int, seed: int,
                 device: str = "cpu") -> TrainLoader | MixLoader:
    """The loader of one dataset (data.dir) or of a mixture (data.mix)."""
    if len(sources) == 1:
        return TrainLoader(sources[0].dataset, micro_batch, seq_len, rank, world_size, seed, device=device)
    return MixLoader(sources, micro_batch, seq_len, rank, world_size, seed, device=device)


def val_batches(dataset: Dataset, micro_batch: int, seq_len: int, rank: int, world_size: int,
                n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same val windows at every evaluation: the first n_batches * world_size * B in file order, split by rank.
    n_batches 0 (a run that never evaluates) reads and needs nothing."""
    if n_batches == 0:
        return []
    index = WindowIndex(dataset, "val", seq_len)
    per_batch = micro_batch * world_size
    n = min(n_batches, index.total // per_batch)
    if n == 0:
        val_tokens = sum(f.tokens for f in index.files)
        raise DatasetError(f"{dataset.path}: the val split holds {val_tokens:,} tokens, {index.total} windows of "
                           f"{seq_len + 1}, fewer than one validation batch of {per_batch} windows (micro_batch "
                           f"{micro_batch} x world_size {world_size}); prepare it with more --val-tokens, or set "
                           "eval.every=0")
    return [index.read(np.arange(i * per_batch + rank * micro_batch, i * per_batch + (rank + 1) * micro_batch))
            for i in range(n)]
