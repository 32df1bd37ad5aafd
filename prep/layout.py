"""Where every token of the finished dataset comes from: the layout finalize's array tasks share.

The train split is the units' train documents concatenated in unit order and cut into shards of shard_tokens;
the validation split likewise from their validation documents (recipe.VAL_RULE picks them). Both follow from the
units' index files alone (per document: holdout hash and token count), so any process can compute which unit
byte ranges feed train shard k without reading a token or talking to another process. The layout is computed
once, under DS/.work/layout.lock, and cached in DS/.work/layout.npz: reading every index is 16 bytes a document
(about 6 GB for 350BT), not something each of N tasks should repeat.

Each unit has a home: the train shard holding its first train token (the shard its position in the train stream
falls in, for a unit without train tokens). The task writing a home shard also copies the validation documents of
the units homed there into DS/.work/shards/holdout_K.bin, so a unit is read only by the tasks of the train shards
it feeds; once all of those are done, nothing needs the unit any more and its token file can go.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import files
from common.errors import PipelineError

from .workdir import WorkDirError, layout_path

SPLITS = ("train", "val")


class LayoutError(PipelineError):
    pass


def select_validation(indexes: list[np.ndarray], val_tokens: int) -> list[np.ndarray]:
    """Per unit, the sorted positions of its validation documents (see recipe.VAL_RULE).

    Only documents under a hash threshold are gathered and sorted, so memory follows the validation size, not the
    corpus; the threshold starts at about twice the needed fraction and grows until enough tokens are under it.
    """
    empty = [np.zeros(0, dtype=np.int64) for _ in indexes]
    if val_tokens == 0:
        return empty
    total = sum(int(idx["tokens"].sum()) for idx in indexes)
    if val_tokens >= total:
        raise LayoutError(f"--val-tokens {val_tokens:,} leaves no training data: the inputs hold {total:,} tokens")
    fraction = min(1.0, 2.0 * val_tokens / total + 1e-6)
    while True:
        threshold = np.uint64(min(int(fraction * 2**64), 2**64 - 1))
        cand = [(u, np.nonzero(idx["hash"] <= threshold)[0]) for u, idx in enumerate(indexes)]
        hashes = np.concatenate([indexes[u]["hash"][pos] for u, pos in cand])
        lengths = np.concatenate([indexes[u]["tokens"][pos] for u, pos in cand])
        units = np.concatenate([np.full(len(pos), u) for u, pos in cand])
        positions = np.concatenate([pos for _, pos in cand])
        order = np.lexsort((positions, units, hashes))  # hash first; input order breaks (unlikely) ties
        cum = np.cumsum(lengths[order])
        if len(cum) and cum[-1] >= val_tokens:
            chosen = order[: int(np.searchsorted(cum, val_tokens)) + 1]
            break
        fraction = min(1.0, fraction * 4)
    result = []
    for u in range(len(indexes)):
        result.append(np.sort(positions[chosen][units[chosen] == u]))
    return result


def unit_runs(lengths: np.ndarray, val_positions: np.ndarray):
    """(start, end, is_val) token ranges of a unit: maximal runs of consecutive documents in one split."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    cursor = 0
    for pos in val_positions:
        if pos > cursor:
            yield int(offsets[cursor]), int(offsets[pos]), False
        yield int(offsets[pos]), int(offsets[pos + 1]), True
        cursor = pos + 1
    if cursor < len(lengths):
        yield int(offsets[cursor]), int(offsets[-1]), False


@dataclass(frozen=True)
class Piece:
    """Tokens [start, end) of source `source` (a unit's position in the plan, or a train shard's holdout file)."""
    source: int
    start: int
    end: int


class Layout:
    """The shard layout of a dataset: built from the units' indexes, or loaded from DS/.work/layout.npz."""

    def __init__(self, unit_tokens: np.ndarray, runs: np.ndarray, shard_tokens: int):
        self.unit_tokens = np.asarray(unit_tokens, dtype=np.int64)
        self.runs = np.asarray(runs, dtype=np.int64).reshape(-1, 4)  # (unit, start, end, is_val), unit order
        self.shard_tokens = int(shard_tokens)
        S = self.shard_tokens
        self.split_runs = {s: self.runs[self.runs[:, 3] == (s == "val")][:, :3] for s in SPLITS}
        self.offsets = {s: np.concatenate([[0], np.cumsum(r[:, 2] - r[:, 1])]) for s, r in self.split_runs.items()}
        self.totals = {s: int(self.offsets[s][-1]) for s in SPLITS}
        self.n_shards = {s: -(-self.totals[s] // S) for s in SPLITS}
        n_units = len(self.unit_tokens)
        per_unit = {s: np.bincount(self.split_runs[s][:, 0], weights=self.split_runs[s][:, 2] - self.split_runs[s][:, 1],
                                   minlength=n_units).astype(np.int64) for s in SPLITS}
        # Train stream position of each unit's first train token; its home shard; the last train shard it feeds.
        before = np.concatenate([[0], np.cumsum(per_unit["train"])[:-1]]).astype(np.int64)
        last_shard = max(self.n_shards["train"] - 1, 0)
        self.home = np.minimum(before // S, last_shard)
        self.last = np.where(per_unit["train"] > 0, (before + per_unit["train"] - 1) // S, self.home)
        # Validation tokens of the units homed at each train shard: the holdout file of that shard.
        self.holdout_tokens = np.bincount(self.home, weights=per_unit["val"],
                                          minlength=self.n_shards["train"]).astype(np.int64)
        self.holdout_offsets = np.concatenate([[0], np.cumsum(self.holdout_tokens)])

    # --- building and caching ---

    @classmethod
    def build(cls, indexes: list[np.ndarray], val_tokens: int, shard_tokens: int) -> "Layout":
        val_sets = select_validation(indexes, val_tokens)
        runs = [(u, a, b, int(v)) for u, (idx, val) in enumerate(zip(indexes, val_sets))
                for a, b, v in unit_runs(idx["tokens"], val)]
        unit_tokens = [int(idx["tokens"].sum()) for idx in indexes]
        if all(v for *_, v in runs):  # whole documents: the last one chosen may take what was left
            raise LayoutError(f"--val-tokens {val_tokens:,} leaves no training data: the validation documents "
                              f"hold all {sum(unit_tokens):,} tokens")
        return cls(np.array(unit_tokens, dtype=np.int64), np.array(runs, dtype=np.int64), shard_tokens)

    def save(self, path: Path) -> None:
        with files.atomic_file(path) as f:
            np.savez(f, unit_tokens=self.unit_tokens, runs=self.runs, shard_tokens=np.int64(self.shard_tokens))

    @classmethod
    def load(cls, path: Path) -> "Layout":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["unit_tokens"], z["runs"], int(z["shard_tokens"]))
        except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError) as exc:
            raise WorkDirError(f"{path}: damaged shard layout ({exc}); delete it and rerun finalize to compute it "
                               f"again") from None

    # --- what a shard holds ---

    def shard_name(self, split: str, k: int) -> str:
        return f"{split}_{k:06d}.bin"

    def shard_count(self, split: str, k: int) -> int:
        return min(self.shard_tokens, self.totals[split] - k * self.shard_tokens)

    def train_pieces(self, k: int) -> list[Piece]:
        """The unit ranges that make train shard k, in order."""
        return _cut(self.split_runs["train"], self.offsets["train"], k * self.shard_tokens,
                    k * self.shard_tokens + self.shard_count("train", k))

    def holdout_pieces(self, k: int) -> list[Piece]:
        """The unit ranges of the validation documents of the units homed at train shard k, in unit order."""
        lo, hi = np.searchsorted(self.home, k, "left"), np.searchsorted(self.home, k, "right")
        val = self.split_runs["val"]
        a, b = np.searchsorted(val[:, 0], lo, "left"), np.searchsorted(val[:, 0], hi, "left")
        return [Piece(int(u), int(s), int(e)) for u, s, e in val[a:b]]

    def val_pieces(self, j: int) -> list[Piece]:
        """The holdout-file ranges (source = train shard) that make validation shard j, in order."""
        start = j * self.shard_tokens
        end = start + self.shard_count("val", j)
        nonempty = np.nonzero(self.holdout_tokens)[0]
        sources = np.stack([nonempty, np.zeros_like(nonempty), self.holdout_tokens[nonempty]], axis=1)
        return _cut(sources, self.holdout_offsets[np.concatenate([nonempty, [len(self.holdout_tokens)]])],
                    start, end)

    def units_read_by(self, k: int) -> range:
        """The units whose tokens train shard k reads (its train pieces, and the units homed at it)."""
        return range(int(np.searchsorted(self.last, k, "left")), int(np.searchsorted(self.home, k, "right")))

    def readers(self, unit: int) -> range:
        """The train shards that read `unit`: once all are done, its token file is no longer needed."""
        return range(int(self.home[unit]), int(self.last[unit]) + 1)

    def task_shards(self, task_index: int, task_count: int) -> range:
        """Array task I of N's train shards: a contiguous run, the runs of all tasks disjoint and covering all."""
        n = self.n_shards["train"]
        return range(task_index * n // task_count, (task_index + 1) * n // task_count)


def _cut(runs: np.ndarray, offsets: np.ndarray, start: int, end: int) -> list[Piece]:
    """The parts of the stream `runs` (rows source, start, end; offsets = their cumulative lengths) in [start, end)."""
    pieces = []
    i = int(np.searchsorted(offsets, start, "right")) - 1
    while start < end:
        source, a, b = (int(x) for x in runs[i])
        lo = a + (start - int(offsets[i]))
        hi = min(b, lo + (end - start))
        if hi > lo:
            pieces.append(Piece(source, lo, hi))
        start += hi - lo
        i += 1
    return pieces


def load_or_build(out: Path, build) -> Layout:
    """The cached layout of `out`, or build() it and cache it; one process builds while the others wait for it."""
    path = layout_path(out)
    if path.exists():  # written atomically: once it is there it is whole
        return Layout.load(path)
    with files.lock(path.with_suffix(".lock"), f"the shard layout of {out}", wait=True):
        if path.exists():  # built by the process this one waited for
            return Layout.load(path)
        layout = build()
        layout.save(path)
        return layout
