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
import os
import re
from pathlib import Path

import numpy as np

from common import files
from common.errors import PipelineError, UsageError

INDEX_DTYPE = np.dtype([("hash", "<u8"), ("tokens", "<i8")])
# The names prep writes (and nothing else is removed with .work/): in .work/, in .work/units/, in .work/shards/, and
# in DS/ itself; a temporary of any of them (common.files.tmp_sibling) is prep's too.
OWN_NAMES = {
    "": re.compile(r"recipe\.json|plan\.json|layout\.npz|layout\.lock|lock|(finalize-)?task-\d+-of-\d+\.lock"),
    "units": re.compile(r"u\d{6}\.(bin|idx\.npy|json)"),
    "shards": re.compile(r"(train|val)_\d{6}\.(bin|json)|holdout_\d{6}\.bin"),
}
DATASET_NAMES = re.compile(r"manifest\.json|(train|val)_\d{6}\.bin")
TMP_NAME = re.compile(rf"\.(.+){re.escape(files.TMP_MARK)}.+")


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


def is_own(name: str, pattern: re.Pattern) -> bool:
    """A name prep writes (per `pattern`), or a temporary of one."""
    tmp = TMP_NAME.fullmatch(name)
    return bool(pattern.fullmatch(tmp.group(1) if tmp else name))


def check_out_dir(out: Path) -> None:
    """--out must be new, empty, a dataset, or prep's unfinished work: never another directory that prep would
    write into (and whose files finalize would then meet in .work/)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise WorkDirError(f"{out}: --out is a file, not a directory; give a new or empty directory")
    names = sorted(os.listdir(out))
    if not names or "manifest.json" in names or (work_dir(out) / "recipe.json").exists():
        return
    # A prep process working (or stopped) between taking its lock and writing recipe.json has made no more than
    # its lock files and units/ in .work/.
    if names == [".work"] and work_dir(out).is_dir() and all(is_own(n, OWN_NAMES[""]) or n in OWN_NAMES
                                                             for n in os.listdir(work_dir(out))):
        return
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise WorkDirError(f"{out}: not empty ({shown}) and not a dataset (no manifest.json, no .work/recipe.json): "
                       f"prep writes only into a new or empty --out, or a dataset it made; give another --out")


def remove_work_dir(out: Path) -> list[str]:
    """Remove what prep wrote under DS/.work/ (the dataset lock file too: see the module docstring); each folder
    goes only once empty. Returns the paths left there, which prep did not write (nothing else is removed)."""
    left = []
    for sub, pattern in OWN_NAMES.items():
        folder = work_dir(out) / sub if sub else work_dir(out)
        if folder.is_symlink() or not folder.is_dir():  # a link: not a folder prep made
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and is_own(entry.name, pattern):
                    os.unlink(entry.path)
                elif not (entry.is_dir(follow_symlinks=False) and not sub and entry.name in OWN_NAMES):
                    left.append(entry.path)
        if sub:
            with contextlib.suppress(OSError):  # not empty: what is left is listed
                folder.rmdir()
    if not left:
        with contextlib.suppress(FileNotFoundError):
            work_dir(out).rmdir()
    return sorted(left)


def remove_stale_tmp(out: Path) -> None:
    """Temporaries of DS/'s own files (shards, manifest) left by killed finalizers; only under the dataset lock."""
    for path in out.glob(f".*{files.TMP_MARK}*"):
        if path.is_file() and is_own(path.name, DATASET_NAMES):
            path.unlink(missing_ok=True)


def load_json(path: Path, what: str = "file"):
    """A JSON file the pipeline wrote; a damaged one (truncated, edited) is an error naming it, not a traceback."""
    hint = f"a damaged {what}: it was written atomically, so something else changed it"
    obj = files.read_json(path, WorkDirError, hint=hint)
    if not isinstance(obj, dict):  # every one prep writes is an object; its readers index it as one
        raise WorkDirError(f"{path}: not a JSON object; {hint}")
    return obj


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
