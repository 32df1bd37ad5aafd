"""DeepSpeed's CPU communication op (deepspeed_shm_comm): where it is built, built once at install, and its lock.

On CPU, DeepSpeed builds this op with torch's cpp_extension whenever a process group is made. torch keeps the build
in TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions, one directory for every virtual environment of the
account whatever torch or DeepSpeed each holds; a cold build takes minutes on a busy CPU. So a run inside a venv
uses the venv's own directory (unless the user set one), `make install` fills it (`python -m train.extensions`),
and each start-up finds the build done: torch then only checks that it is up to date.

torch serialises builds with a `lock` file in the op's directory (FileBaton), which a killed build leaves behind;
every later process would then wait on it forever, silently. A lock is waited on only while it is younger than a
build can take, saying so in one line, and an older one is refused in one line that gives the rm command.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from common.errors import PipelineError

OP = "deepspeed_shm_comm"
# A cold build of the op took 1 min 42 s on 2 busy cores; a lock older than this is left by a killed build.
STALE_AFTER_S = 600.0
# The other ranks of a run wait a second or two while one checks the build: only a longer wait is said.
NOTICE_AFTER_S = 10.0
POLL_S = 0.5


class StaleLockError(PipelineError):
    pass


def venv_build_dir() -> Path | None:
    """This virtual environment's extension directory; None outside a venv (torch's default applies there).

    Keyed by the venv's path as this interpreter spells it: a venv reached through a symlink (another checkout's
    `.venv -> this one`) imports torch and DeepSpeed under that spelling, which is in the build's command line, so
    sharing one directory would make each spelling rebuild the op over the other's.
    """
    if sys.prefix == sys.base_prefix:
        return None
    return Path(sys.prefix) / "torch_extensions" / hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]


def use_venv_build_dir(env=os.environ) -> str | None:
    """Point TORCH_EXTENSIONS_DIR at the venv's directory unless the user set one; returns the directory used."""
    if not env.get("TORCH_EXTENSIONS_DIR") and venv_build_dir() is not None:
        env["TORCH_EXTENSIONS_DIR"] = str(venv_build_dir())
    return env.get("TORCH_EXTENSIONS_DIR")


def op_build_dir(name: str = OP) -> Path:
    """Where torch builds extension `name`: TORCH_EXTENSIONS_DIR/name, or its default root/pyXY_cpu/name."""
    from torch.utils.cpp_extension import _get_build_directory
    return Path(_get_build_directory(name, verbose=False))


def wait_for_lock(build_dir: Path, stale_after: float = STALE_AFTER_S, log=print) -> None:
    """Return once no build holds build_dir's lock. A lock older than stale_after seconds (now, or while waiting)
    raises StaleLockError naming it; a younger one is another process's build: waited on, and said in one line
    once the wait passes NOTICE_AFTER_S."""
    lock = build_dir / "lock"
    said, start = False, time.monotonic()
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > stale_after:
            raise StaleLockError(
                f"{lock} is a stale lock, left {age / 60:.0f} min ago by a build of DeepSpeed's CPU op ({build_dir.name}) "
                f"that was killed; every CPU run waits on it forever: if no build is running, remove it "
                f"(rm {lock}) and rerun")
        if not said and time.monotonic() - start >= NOTICE_AFTER_S:
            log(f"waiting for another process's build of {build_dir.name} to release {lock} (if none is running, the "
                f"lock is stale: rm {lock}; it is refused once {stale_after / 60:.0f} min old)", flush=True)
            said = True
        time.sleep(POLL_S)


def build() -> int:
    """`make install`'s step: build the op into the venv's directory now, so that no start-up builds it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    where = use_venv_build_dir()
    try:
        wait_for_lock(op_build_dir())
        from deepspeed.accelerator import get_accelerator
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None:
            print(f"{OP}: this DeepSpeed has no CPU communication op to build")
            return 0
        builder.load(verbose=False)
    except StaleLockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - no compiler (or ninja) here: install still succeeds, CPU runs say why
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"note: DeepSpeed's CPU communication op was not built ({first}); GPU training does not need it, CPU "
              f"training needs a C++ compiler and builds it at its first start-up", file=sys.stderr)
        return 0
    print(f"{OP}: built in {where or op_build_dir().parent}")
    return 0


if __name__ == "__main__":
    sys.exit(build())
