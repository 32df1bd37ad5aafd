"""File safety for every file the pipeline writes: atomic files and directories, whole-line appends, locks.

Readers (and a rerun after SIGKILL) see either the old content or the complete new one, never a prefix:
- atomic_file / write_*: a temporary sibling in the same directory, fsync of the file, rename over the target,
  fsync of the directory (so the rename survives a power cut); on any failure the temporary is removed.
- atomic_dir: the same for a directory built in a temporary sibling.
- append_line: one whole line under an exclusive lock; a partial last line left by a killed writer is cut off
  first, so a fragment never merges into the next record.
- read_json / read_json_lines: the readers of JSON and JSON-lines files, with one error policy (a missing file is
  the OSError naming it; a malformed file or line is one error naming file:line; a partial last line of an
  append-only file is skipped).
- lock / try_lock: an advisory exclusive lock (fcntl.flock) on a lock file that records who holds it; the
  kernel drops it when the last process holding the open lock file ends. A filesystem without flock is an
  error (LocksUnsupported), never a reason to go on unlocked.
Files and directories get the permissions the umask gives (0644 / 0755 under umask 022), unlike mkstemp and
mkdtemp, which make them owner-only.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

from .errors import PipelineError

TMP_MARK = ".tmp-"


def tmp_sibling(path: Path) -> Path:
    """A hidden, unique temporary name beside `path`.

    Host and pid say whose leftover it is; the random part keeps two threads of one process, or a process that
    got the pid of a dead writer's leftover, from sharing a name.
    """
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems (and /proc-like mounts) refuse fsync on a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


# One block: a full disk or an exhausted quota refuses it, where an empty file would not tell.
PROBE_BYTES = 4096


def probe_write(directory: Path) -> None:
    """Create, fill (PROBE_BYTES), fsync and remove a temporary file in `directory`: whether the files a command
    will write there can be written, asked before its work rather than after (the OSError says why not).
    Permission bits alone would not do: root passes them on a read-only mount."""
    path = tmp_sibling(Path(directory) / "write-test")
    try:
        with open(path, "xb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(OSError):  # never an error here in place of the one that says why
            path.unlink()


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb"):
    """Yield a file object on a temporary sibling of `path`; on success it replaces `path`, on failure it is gone."""
    path = Path(path)
    tmp = tmp_sibling(path)
    encoding = None if "b" in mode else "utf-8"  # never the locale's: the same bytes on every node
    try:
        # "x": a unique name that must not exist; open(), not mkstemp: the umask decides the permissions.
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a full disk names no file: say which one
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def current_umask() -> int:
    # /proc reads it without changing it; os.umask can only read it by setting it (not thread-safe).
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_to_umask(path) -> None:
    """Give a file another library created owner-only (mkstemp, safetensors) the permissions open() would."""
    os.chmod(path, 0o666 & ~current_umask())


def write_bytes(path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text(path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path, obj, indent: int | None = 1) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


class MalformedJSON(PipelineError, ValueError):
    """A JSON file, or a line of a JSON-lines file, that is not UTF-8 JSON (a ValueError, as json's own error is)."""


def read_json(path, error: type[PipelineError] = MalformedJSON, hint: str = ""):
    """A whole JSON file: the one reader of every JSON file, with one error policy.

    Missing or unreadable: the OSError, which names the file (common.cli prints it as one line); not UTF-8 or not
    JSON: `error`, naming the file and line, then `hint` (what damaged it, what to do).
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_one_of_each_key)
    except UnicodeDecodeError as exc:
        raise error(_malformed(path, f"invalid UTF-8 at byte {exc.start + 1}", hint)) from None
    except json.JSONDecodeError as exc:
        raise error(_malformed(f"{path}:{exc.lineno}", f"not valid JSON ({exc.msg}, column {exc.colno})",
                               hint)) from None
    except DuplicateKey as exc:
        raise error(_malformed(path, str(exc), hint)) from None
    except (RecursionError, ValueError) as exc:
        raise error(_malformed(path, beyond_json(exc), hint)) from None


class DuplicateKey(ValueError):
    pass


def _one_of_each_key(pairs: list) -> dict:
    """json keeps the last of two equal keys; in a file a person writes (a DeepSpeed config) that hides a typo."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DuplicateKey(f"the key {twice[:40]!r} twice in one object")
    return obj


def beyond_json(exc: Exception) -> str:
    """What made valid JSON unreadable here: nesting deeper than the parser recurses, or an integer longer than
    Python reads (4,300 digits). Neither is in a file the pipeline writes."""
    if isinstance(exc, RecursionError):
        return "nested too deeply to read"
    return f"unreadable ({str(exc).split(';')[0][:100]})"


def read_json_lines(path, error: type[PipelineError] = MalformedJSON, append_only: bool = True, hint: str = ""):
    """Yield (line number, record) for each non-blank line of a JSON-lines file, streamed.

    Missing: FileNotFoundError, as read_json. A line that is not UTF-8 JSON: `error`, naming file:line. For an
    append-only file (append_line's), a last line without its newline is a killed writer's partial line, or a live
    writer's line half-written: it is skipped, as the next append cuts it off; elsewhere it is read like any other.
    """
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if append_only and not raw.endswith(b"\n"):
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(_malformed(f"{path}:{lineno}", f"invalid UTF-8 at byte {exc.start + 1} of the line",
                                       hint)) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(_malformed(f"{path}:{lineno}", f"not valid JSON ({exc.msg}, column {exc.colno})",
                                       hint)) from None
            except (RecursionError, ValueError) as exc:
                raise error(_malformed(f"{path}:{lineno}", beyond_json(exc), hint)) from None
            yield lineno, record


def _malformed(where, what: str, hint: str) -> str:
    return f"{where}: {what}" + (f"; {hint}" if hint else "")


def fsync_tree(directory: Path, keep=None) -> None:
    """fsync every file (those for which keep(path) is true, if given) and directory under `directory`."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if keep is not None and not keep(Path(root, name)):
                continue
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_dir(path, replace: bool = False):
    """Yield a temporary sibling directory; on success it becomes `path`, on failure it is removed.

    An existing `path` is replaced only with replace=True (the caller has checked it is its own earlier output);
    otherwise an existing `path` is an error and nothing is touched, also when it appears while this one is
    written (another writer of the same path finished first). The temporaries of `path` that a killed writer on
    this host left (gigabytes, for a model) are removed first.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise PipelineError(f"{path} already exists")
    remove_dead_writers_temporaries(path)
    tmp = tmp_sibling(path)
    os.mkdir(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            if not replace:
                raise PipelineError(f"{path} appeared while this was being written (another writer finished "
                                    f"first); it is left as it is")
            old = tmp_sibling(path.with_name(f"{path.name}.old"))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_dead_writers_temporaries(path: Path) -> None:
    """Remove the temporary siblings of `path` (tmp_sibling's names) whose writer, on this host, is no longer
    running. A replaced copy (`.NAME.old.tmp-*`) goes only while `path` exists: killed between its two renames,
    a replace leaves the previous output there alone."""
    host = socket.gethostname()
    for name, needs_path in ((path.name, False), (f"{path.name}.old", True)):
        prefix = f".{name}{TMP_MARK}{host}-"
        for leftover in path.parent.glob(f"{glob.escape(prefix)}*"):
            pid = leftover.name[len(prefix):].rsplit("-", 1)[0]
            if not pid.isdigit() or _running(int(pid)) or (needs_path and not path.exists()):
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# flock() on a filesystem mounted without lock support (Lustre without -o flock, some NFS setups).
NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def append_line(path, line: str, durable: bool = True) -> int:
    """Append `line` (no newline inside) as one whole line, under an exclusive lock, flushed to disk.

    A last line without its newline is a fragment of a writer killed mid-write: it is cut off, not completed,
    because its record is incomplete. Concurrent appenders never interleave. Returns the bytes cut (0 mostly).
    durable=False leaves the line in the OS's cache (it survives the writer's death, not the machine's) for a
    frequent writer that makes it durable itself, with fsync_file, on its own cadence.
    """
    if "\n" in line:
        raise ValueError("append_line: the line contains a newline")
    try:
        with open(path, "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError as exc:
                # Such a mount still serves a file with a single writer (train's rank 0's metrics) whole-line
                # safely; only concurrent appenders need the lock, and they fail at their own lock first.
                if exc.errno not in NO_LOCKS:
                    raise
            cut = repair_last_line(f)
            f.write(line.encode("utf-8") + b"\n")
            f.flush()
            if durable:
                os.fsync(f.fileno())
            # Closing the file releases the lock.
    except OSError as exc:
        # A full disk names no file: say which one. Caught outside the `with`: after a failed flush, close()
        # flushes the rest again, and its error (nameless too) would replace the first one.
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return cut


def append_json_line(path, record, durable: bool = True) -> int:
    return append_line(path, json.dumps(record), durable)


def fsync_file(path) -> None:
    """Make what was written to `path` (by any descriptor) durable; a file not there yet has nothing to sync."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.filename is None:  # a full disk names no file: say which one
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        os.close(fd)


def repair_last_line(f) -> int:
    """Truncate an open (binary, read+write) file after its last newline; returns the bytes cut."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return 0
    pos, chunk = end, 4096
    while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        block = f.read(pos - start)
        if start + len(block) == end and block.endswith(b"\n"):
            return 0
        cut = block.rfind(b"\n")
        if cut >= 0:
            keep = start + cut + 1
            f.truncate(keep)
            f.seek(keep)
            return end - keep
        pos = start
    f.truncate(0)
    f.seek(0)
    return end


class Locked(PipelineError):
    """Another process holds the lock; `holder` is its record (this_process() of the holder)."""

    def __init__(self, message: str, holder: str = ""):
        super().__init__(message)
        self.holder = holder


class LocksUnsupported(PipelineError):
    """The filesystem refuses flock: running on unlocked would let two processes interleave their writes."""


def _flock(f, path: Path, operation: int) -> None:
    """fcntl.flock, with a filesystem that has no locks said in one line (BlockingIOError passes through)."""
    try:
        fcntl.flock(f, operation)
    except BlockingIOError:
        raise
    except OSError as exc:
        if exc.errno not in NO_LOCKS:
            raise
        raise LocksUnsupported(
            f"cannot lock {path}: its filesystem refuses file locks ({exc.strerror or exc}), as Lustre mounted "
            f"without -o flock and some NFS mounts do; mount it with locks (Lustre: -o flock; NFS: lockd running, "
            f"no 'nolock'), or put the dataset or run directory on a filesystem that has them") from exc


def this_process() -> str:
    """'host H pid P since T[, Slurm job J]': how lock files and other markers name the process that wrote them
    (the job id lets a requeued job recognise its own earlier incarnation)."""
    job = os.environ.get("SLURM_JOB_ID")
    return (f"host {socket.gethostname()} pid {os.getpid()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}" + (f", Slurm job {job}" if job else ""))


def _record_holder(f) -> None:
    f.seek(0)
    f.truncate()
    f.write(this_process() + "\n")
    f.flush()


def _holder(f, wanted_shared: bool) -> str:
    """Who holds the lock on f (which we failed to take): an exclusive holder's record, once it is written."""
    if not wanted_shared:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            exclusive = False  # only shared holders, which record no name
        except BlockingIOError:
            exclusive = True
    else:
        exclusive = True  # a shared request is refused only by an exclusive holder
    # An exclusive holder writes its record just after taking the lock: wait briefly rather than report nobody.
    deadline = time.monotonic() + (2.0 if exclusive else 0.0)
    while True:
        f.seek(0)
        text = f.read().strip()
        if text or time.monotonic() >= deadline:
            return text or "another process"
        time.sleep(0.01)


@contextlib.contextmanager
def lock(path, what: str, wait: bool = False, shared: bool = False):
    """Hold an exclusive advisory lock on the lock file `path` for the block; `what` names the thing locked.

    Without wait, a lock held elsewhere raises Locked naming the holder (host, pid, since when) and touches
    nothing else. shared=True takes a shared lock instead: many shared holders at once, never beside an exclusive
    one; they record no holder (the file then names nobody). The lock file normally stays: removing it would let
    a third process lock a different inode. A holder may still remove it together with what it guards (prep
    removes DS/.work that way); whoever then gets the removed file's lock takes the lock again on the path.
    A filesystem that refuses flock raises LocksUnsupported naming the lock file.
    """
    path = Path(path)
    while True:
        f = open(path, "a+", encoding="utf-8")
        try:
            _flock(f, path, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
            if _still_named(f, path):
                break
        except BlockingIOError:
            holder = _holder(f, shared)
            f.close()
            raise Locked(f"{what} is in use by {holder} (lock {path}); wait for it to finish, or pass --wait",
                         holder) from None
        except BaseException:
            f.close()
            raise
        f.close()  # the holder removed this file while we waited: lock the path's new file
    try:
        if shared:
            f.truncate(0)  # no exclusive holder exists now, so any name in the file is stale
        else:
            _record_holder(f)
        yield
    finally:
        f.close()  # closing releases the flock


def _still_named(f, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


@contextlib.contextmanager
def try_lock(path):
    """Yield the open lock file while holding an exclusive lock on `path`, None (at once) if another process has it.

    The holder is recorded in the file. A child started with pass_fds=[f.fileno()] shares the lock: it stays held
    until the last of them ends, so an orphan of a killed process keeps others out until it finishes.
    A filesystem that refuses flock raises LocksUnsupported, as lock() does.
    """
    with open(path, "a+", encoding="utf-8") as f:
        try:
            _flock(f, Path(path), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        _record_holder(f)
        yield f
