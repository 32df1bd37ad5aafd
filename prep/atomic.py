"""Write-then-rename helpers: a reader (or a rerun after SIGKILL) sees either the old file or the complete new one."""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path


def tmp_name(path: Path) -> Path:
    # Host and pid make the name unique across concurrent array tasks on a shared filesystem.
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb"):
    """Open a temporary sibling of `path`; on success fsync and rename it over `path`, on failure delete it."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def remove_stale_tmp(directory: Path) -> None:
    """Temporary files left by killed writers in `directory` (only call where no other writer can be running)."""
    for p in Path(directory).glob(".*.tmp-*"):
        p.unlink(missing_ok=True)
