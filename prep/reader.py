"""Read a finished dataset directory (manifest.json and its shards): what train/ and eval/ use."""
from __future__ import annotations

import os
import resource
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import files
from common.errors import PipelineError

from .shard import HEADER_BYTES, TOKEN_DTYPE, ShardError, open_shard, read_header

MANIFEST = "manifest.json"


class DatasetError(PipelineError):
    """A directory that is not a usable dataset; the message says why."""


def read_manifest(path: Path) -> dict:
    """manifest.json as a dict; a damaged one (truncated, not JSON) is an error naming the file."""
    manifest = files.read_json(path, DatasetError, hint=f"a malformed manifest: it is written atomically, so "
                               f"something else damaged it: delete {Path(path).parent} and tokenize again")
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: malformed manifest (not a JSON object)")
    return manifest


@dataclass(frozen=True)
class ShardInfo:
    name: str
    split: str
    tokens: int
    documents: int
    sha256: str


class Dataset:
    """A prepared dataset: its manifest and memory-mapped shards, validated at open."""

    def __init__(self, path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            hint = " (tokenize has not finished: run `python -m prep finalize`)" if (self.path / ".work").exists() else ""
            raise DatasetError(f"{self.path}: no {MANIFEST}; not a finished dataset{hint}")
        self.manifest = read_manifest(manifest_path)
        try:
            self.shards = [ShardInfo(**{k: s[k] for k in ShardInfo.__dataclass_fields__})
                           for s in self.manifest["shards"]]
            tok = self.manifest["tokenizer"]
            self.n_vocab, self.eot = int(tok["n_vocab"]), int(tok["eot"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{manifest_path}: malformed manifest ({exc})") from None

    def split(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def checked_path(self, shard: ShardInfo) -> Path:
        """The shard's path, once its header (magic, version, size) agrees with the manifest's token count."""
        path = self.path / shard.name
        n = read_header(path)
        if n != shard.tokens:
            raise ShardError(f"{path}: {n} tokens, manifest says {shard.tokens}")
        return path

    def open(self, shard: ShardInfo) -> np.ndarray:
        """Memory-map one shard; its header must agree with the manifest."""
        return open_shard(self.checked_path(shard))

    def arrays(self, split: str) -> list[np.ndarray]:
        return [self.open(s) for s in self.split(split)]

    def files(self, split: str) -> list["ShardFile"]:
        """Every shard of `split` opened for positional reads (what the training loader uses); headers checked."""
        shards = self.split(split)
        ensure_open_files(len(shards), self.path)
        return [ShardFile(self.checked_path(s), s.tokens) for s in shards]


class ShardFile:
    """One shard read with pread, not a memory map.

    pread releases the GIL for the whole read (a cold read can take milliseconds), reads only the pages asked
    for (a page fault in a map reads ahead around it), and leaves no mapped pages behind, so a loader reading
    random windows for days does not grow the process's RSS. Threads may read one ShardFile concurrently.
    """

    def __init__(self, path: Path, tokens: int):
        self.path, self.tokens = Path(path), tokens
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, self.fd)

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Tokens [start, start + len(out)) into the contiguous uint16 array `out`."""
        if out.dtype != TOKEN_DTYPE or not out.flags.c_contiguous or start < 0 or start + out.size > self.tokens:
            raise ValueError(f"read_into({start}, {out.dtype}[{out.size}]) outside {self.path} ({self.tokens} tokens)")
        view, offset = memoryview(out).cast("B"), HEADER_BYTES + 2 * start
        while len(view):
            got = os.preadv(self.fd, [view], offset)
            if got == 0:
                raise ShardError(f"{self.path}: ends before token {start + out.size:,} although its header "
                                 f"promised {self.tokens:,} tokens (truncated while open?)")
            view, offset = view[got:], offset + got


# Descriptors kept free beside the shards: sockets, logs, checkpoint files, DeepSpeed's and torch's own.
SPARE_FILES = 512


def ensure_open_files(n_shards: int, where: Path) -> None:
    """Raise the soft open-file limit to what n_shards descriptors need (up to the hard limit), or say why not.

    Each rank keeps one descriptor per train shard: a 350B-token dataset of 100M-token shards is 3,500 of them,
    above the usual soft limit of 1,024; the hard limit is usually far higher and raising to it is harmless.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n_shards + SPARE_FILES
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise DatasetError(f"{where}: {n_shards} shards need {need} open files per process but the hard limit "
                           f"(ulimit -Hn) is {hard}; raise it, or tokenize with larger --shard-tokens")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
