"""The unfinished part of a dataset directory, DS/.work/: its layout, its done markers and its locks.

DS/.work/ holds recipe.json, plan.json, units/ (uNNNNNN.bin tokens, uNNNNNN.idx.npy index, uNNNNNN.json done
marker) and the locks: `lock` (the dataset's) and one `task-I-of-N.lock` per array task. Both tokenize (which
writes units) and finalize (which reads them and removes .work/) use this module, so neither imports the other's
internals.

Locking: a whole tokenize and a finalize hold the dataset lock exclusively; array tasks, which legitimately
share the directory, hold it shared plus their own task's lock exclusively. So two runs on one directory never
interleave: the second says who holds it and stops before writing anything (or waits, with --wait). The lock
file lives in .work/ and goes with it when finalize removes .work/ (common.files.lock allows that), so a
finished dataset holds only its manifest and shards.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from common import files
from common.errors import PipelineError

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


def load_json(path: Path, what: str = "file"):
    """A JSON file the pipeline wrote; a damaged one (truncated, edited) is an error naming it, not a traceback."""
    try:
        return files.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WorkDirError(f"{path}: damaged {what} ({exc}); it was written atomically, so something else changed "
                           f"it") from None


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
                raise files.Locked(f"{out} is in use by running tokenize array task(s) (they hold {path} "
                                   f"shared); wait for them to finish, or pass --wait") from None
        yield


def _names_a_holder(path: Path) -> bool:
    try:
        return bool(path.read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        return True


def task_lock(out: Path, task_index: int, task_count: int, wait: bool):
    """Array task I of N's own lock: two copies of one task (a requeue beside a straggler) never run together."""
    return files.lock(work_dir(out) / f"task-{task_index}-of-{task_count}.lock",
                      f"task {task_index}/{task_count} of {out}", wait=wait)
