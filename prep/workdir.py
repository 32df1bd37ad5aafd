"""The unfinished part of a dataset directory, DS/.work/: its layout, its done markers and its locks.

DS/.work/ holds recipe.json, plan.json, units/ (uNNNNNN.bin tokens, uNNNNNN.idx.npy index, uNNNNNN.json done
marker), finalize's layout.npz (where every output token comes from) and shards/ (train_NNNNNN.bin shards
written by finalize tasks, each with its done mark train_NNNNNN.json and the validation documents of its units,
holdout_NNNNNN.bin), and the locks: `lock` (the dataset's), `layout.lock`, and one `task-I-of-N.lock` per
tokenize array task and `finalize-task-I-of-N.lock` per finalize array task. Both tokenize (which writes units)
and finalize (which reads them and removes .work/) use this module, so neither imports the other's internals.

Locking: a whole tokenize and a whole finalize hold the dataset lock exclusively; array tasks (of tokenize or
of finalize), which legitimately share the directory, hold it shared plus their own task's lock exclusively. So
two runs on one directory never interleave: the second says who holds it and stops before writing anything (or
waits, with --wait). The lock file lives in .work/ and goes with it when finalize removes .work/
(common.files.lock allows that), so a finished dataset holds only its manifest and shards.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from common import files
from common.errors import PipelineError, UsageError

INDEX_DTYPE = np.dtype([("hash", "<u8"), ("tokens", "<i8")])


class WorkDirError(PipelineError):
    """A file under DS/.work/ (or the manifest) that cannot be read; the message names it."""


def work_dir(out: Path) -> Path:
    return Path(out) / ".work"


def units_dir(out: Path) -> Path:
    return work_dir(out) / "units"


def unit_paths(out: Path, index: int) -> dict[str, Path]:
    base = units_dir(out) / f"u{index:06d}"
    return {"tokens": base.with_suffix(".bin"), "index": base.with_suffix(".idx.npy"), "done": base.with_suffix(".json")}


def shards_dir(out: Path) -> Path:
    return work_dir(out) / "shards"


def layout_path(out: Path) -> Path:
    return work_dir(out) / "layout.npz"


def shard_paths(out: Path, name: str) -> dict[str, Path]:
    """A shard being finalized (name: train_NNNNNN.bin): the file, and its done mark, written after it."""
    base = shards_dir(out) / name
    return {"file": base, "done": base.with_suffix(".json")}


def holdout_path(out: Path, train_shard: int) -> Path:
    """The validation tokens of the units whose train tokens start in train shard k (see prep.layout)."""
    return shards_dir(out) / f"holdout_{train_shard:06d}.bin"


def load_json(path: Path, what: str = "file"):
    """A JSON file the pipeline wrote; a damaged one (truncated, edited) is an error naming it, not a traceback."""
    return files.read_json(path, WorkDirError, hint=f"a damaged {what}: it was written atomically, so something "
                                                    f"else changed it")


def is_done(out: Path, unit) -> bool:
    marker = unit_paths(out, unit.index)["done"]
    return marker.exists() and load_json(marker, "done marker").get("unit") == unit.to_dict()


@contextlib.contextmanager
def dataset_lock(out: Path, wait: bool, shared: bool = False):
    """Hold the dataset lock (see the module docstring), creating .work/ for it; files.Locked names the holder."""
    path = work_dir(out) / "lock"
    with contextlib.ExitStack() as held:
        while True:
            work_dir(out).mkdir(parents=True, exist_ok=True)
            try:
                held.enter_context(files.lock(path, f"{out}", wait=wait, shared=shared))
                break
            except FileNotFoundError:  # a finalize removed .work/ while this process waited: lock anew
                continue
            except files.Locked:
                if shared or _names_a_holder(path):
                    raise
                # Only array tasks hold it shared, and shared holders record no name in it.
                raise files.Locked(f"{out} is in use by running tokenize array task(s) or finalize array "
                                   f"task(s) (they hold {path} shared); wait for them to finish, or pass "
                                   f"--wait") from None
        yield


def _names_a_holder(path: Path) -> bool:
    try:
        return bool(path.read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        return True


def check_task_flags(task_index: int | None, task_count: int | None) -> None:
    """--task-index/--task-count (tokenize's and finalize's): both or neither, the index within the count."""
    if (task_index is None) != (task_count is None):
        raise UsageError("--task-index and --task-count go together")
    if task_count is not None and task_count < 1:
        raise UsageError(f"--task-count must be >= 1, got {task_count}")
    if task_count is not None and not 0 <= task_index < task_count:
        raise UsageError(f"--task-index {task_index} is outside 0..{task_count - 1}")


def task_lock(out: Path, task_index: int, task_count: int, wait: bool, stage: str = "tokenize"):
    """Array task I of N's own lock: two copies of one task (a requeue beside a straggler) never run together."""
    prefix = "" if stage == "tokenize" else f"{stage}-"
    return files.lock(work_dir(out) / f"{prefix}task-{task_index}-of-{task_count}.lock",
                      f"{prefix}task {task_index}/{task_count} of {out}", wait=wait)
