"""One token shard in llm.c's layout: 256 little-endian int32 header, then uint16 tokens.

header[0] = MAGIC, header[1] = VERSION, header[2] = token count; file size is exactly 1024 + 2 * count.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np

from common.errors import PipelineError
from common.files import atomic_file

MAGIC = 20240520
VERSION = 1  # uint16 tokens
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
# A shard's fingerprint hashes this many bytes at each end: one page read at each end per shard, cheap enough for
# every rank to check all 3,500 shards of a 350B-token dataset at start, and enough to tell shards of two datasets
# apart (the first covers the header and 1,536 tokens, the last 2,048 tokens).
EDGE_BYTES = 4096


class ShardError(PipelineError):
    """A shard whose header, size or contents do not match the format; the message names the file."""


def make_header(n_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, n_tokens
    return header.tobytes()


# What a dataset file found to be something else is, in the refusal.
NOT_REGULAR = {stat.S_IFIFO: "a named pipe", stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def regular_size(path: Path, error: type[PipelineError] = ShardError) -> int:
    """The size of `path`, which must be a regular file (or a link to one); else `error` naming it.

    Checked before the file is opened: open() of a named pipe waits for a writer for ever (verify and train's
    start-up check hung on one), and a device or a directory has no size to check a shard against.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = NOT_REGULAR.get(stat.S_IFMT(st.st_mode), "a special file")
        raise error(f"{path}: {kind}, not a regular file; a dataset holds only the files prep wrote: prepare the "
                    f"dataset again")
    return st.st_size


def read_header(path: Path) -> int:
    """Validate magic, version and file size; return the token count."""
    path = Path(path)
    try:
        size = regular_size(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read shard ({exc.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic {int(header[0])} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported version {int(header[1])} (expected {VERSION})")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise ShardError(f"{path}: file is {size} bytes, header says {n} tokens ({HEADER_BYTES + 2 * n} bytes)")
    return n


def edges_sha256(path: Path) -> tuple[int, str]:
    """(size, sha256 of the first and last EDGE_BYTES) of a file; the whole file when it is at most twice that."""
    regular_size(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size <= 2 * EDGE_BYTES:
            edges = os.pread(fd, size, 0)
        else:
            edges = os.pread(fd, EDGE_BYTES, 0) + os.pread(fd, EDGE_BYTES, size - EDGE_BYTES)
    finally:
        os.close(fd)
    return size, hashlib.sha256(edges).hexdigest()


def open_shard(path: Path) -> np.ndarray:
    """Memory-map a shard's tokens (read-only uint16) after checking header and size."""
    n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write atomically: a temporary name in the same directory, fsync, then rename."""
    tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
    with atomic_file(Path(path)) as f:
        f.write(make_header(len(tokens)))
        f.write(tokens.tobytes())


class TokenRangeError(PipelineError):
    """A token id that does not fit the uint16 shard format."""


def to_uint16(tokens: np.ndarray, where: str) -> np.ndarray:
    """Narrow tokenizer output to uint16, refusing (never wrapping) ids >= 65536."""
    if len(tokens) and int(tokens.max()) > 0xFFFF:
        bad = int(tokens.max())
        raise TokenRangeError(f"{where}: token id {bad} does not fit in uint16 (>= 65536); "
                              "this tokenizer cannot be stored in llm.c version-1 shards")
    return tokens.astype(TOKEN_DTYPE)
