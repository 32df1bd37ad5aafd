"""Read a finished dataset directory (manifest.json and its shards): what train/ and eval/ use."""
from __future__ import annotations

import os
import re
import resource
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import files, tokenizer
from common.errors import PipelineError, shown

from .shard import (EDGE_BYTES, HEADER_BYTES, TOKEN_DTYPE, ShardError, edges_sha256, open_shard, read_header,
                    regular_size)

MANIFEST = "manifest.json"
# The dataset directory's format (manifest.json and .work/recipe.json): a dataset or unfinished work of another
# version is refused, not read as this one (2: shards carry bytes and edges_sha256).
DATASET_VERSION = 2
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"(train|val)_\d{6}\.bin")


class DatasetError(PipelineError):
    """A directory that is not a usable dataset; the message says why."""


def read_manifest(path: Path) -> dict:
    """manifest.json as a dict; a damaged one (truncated, not JSON) is an error naming the file."""
    regular_size(path, DatasetError)
    manifest = files.read_json(path, DatasetError, hint=f"a malformed manifest: it is written atomically, so "
                               f"something else damaged it: delete {Path(path).parent} and tokenize again")
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: malformed manifest (not a JSON object)")
    check_version(manifest.get("dataset_version"), path)
    return manifest


def check_version(version, path: Path) -> None:
    """Refuse a manifest or .work/recipe.json of another dataset format version (`version` None: before there was one)."""
    if version == DATASET_VERSION:
        return
    if isinstance(version, int) and version > DATASET_VERSION:
        raise DatasetError(f"{path}: written by a newer version of prep (dataset version {version}; this one reads "
                           f"{DATASET_VERSION}): use that version")
    raise DatasetError(f"{path}: written by an earlier version of prep (dataset version {version or 1}; this one "
                       f"reads {DATASET_VERSION}): prepare it again")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    split: str
    tokens: int
    documents: int
    sha256: str
    bytes: int
    edges_sha256: str  # prep.shard.edges_sha256: what train checks at start, without reading the dataset


class Dataset:
    """A prepared dataset: its manifest and shards; the manifest must describe itself consistently at open, and
    the files must match it (check_files) before train reads them."""

    def __init__(self, path):
        self.path = Path(path)
        self.manifest_path = manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            hint = " (tokenize has not finished: run `python -m prep finalize`)" if (self.path / ".work").exists() else ""
            raise DatasetError(f"{self.path}: no {MANIFEST}; not a finished dataset{hint}")
        self.manifest = read_manifest(manifest_path)
        try:
            self.shards = [ShardInfo(**{k: s[k] for k in ShardInfo.__dataclass_fields__})
                           for s in self.manifest["shards"]]
            tok = self.manifest["tokenizer"]
            self.n_vocab, self.eot = tok["n_vocab"], tok["eot"]
            totals = {split: self.manifest["totals"][split] for split in SPLITS}
        except (KeyError, TypeError) as exc:
            raise DatasetError(f"{manifest_path}: malformed manifest ({type(exc).__name__}: {exc})") from None
        self._check_manifest(tok, totals)
        self._files_checked = False

    def _refuse(self, what: str) -> None:
        raise DatasetError(f"{self.manifest_path}: {what}; the manifest does not describe a dataset prep writes "
                           f"(edited or damaged?): prepare the dataset again")

    def _check_manifest(self, tok: dict, totals: dict) -> None:
        """The manifest agrees with itself and with the tokenizer it names (no file is read)."""
        # type(), not isinstance: True is an int to Python; int() would take 50257.9 as 50257 and "50256" as 50256.
        if not (type(self.n_vocab) is int and type(self.eot) is int):
            self._refuse(f"tokenizer n_vocab {shown(self.n_vocab)}, eot {shown(self.eot)} (two JSON integers)")
        if not 0 <= self.eot < self.n_vocab <= 1 << 16:
            self._refuse(f"tokenizer n_vocab {self.n_vocab} / eot {self.eot} do not fit uint16 token shards "
                         f"(0 <= eot < n_vocab <= 65536)")
        if tok.get("name") == tokenizer.ENCODING_NAME and (self.n_vocab, self.eot) != (tokenizer.N_VOCAB,
                                                                                      tokenizer.EOT_TOKEN):
            self._refuse(f"tokenizer {tokenizer.ENCODING_NAME} with n_vocab {self.n_vocab}, eot {self.eot}, but "
                         f"{tokenizer.ENCODING_NAME} has n_vocab {tokenizer.N_VOCAB}, eot {tokenizer.EOT_TOKEN}")
        seen = set()
        for s in self.shards:
            match = SHARD_NAME.fullmatch(s.name) if isinstance(s.name, str) else None
            if match is None or match.group(1) != s.split or s.name in seen:
                self._refuse(f"shard {str(s.name)[:80]!r} ({s.split}) is not a {s.split} shard name of this "
                             f"directory, or is listed twice")
            seen.add(s.name)
            if not isinstance(s.tokens, int) or s.tokens < 0 or s.bytes != HEADER_BYTES + 2 * s.tokens:
                self._refuse(f"shard {s.name}: {s.bytes} bytes for {s.tokens} tokens (a shard of n tokens is "
                             f"{HEADER_BYTES} + 2n bytes)")
            # verify and the totals below compute with these: a string or null there is an edit, not a crash.
            if not isinstance(s.documents, int) or s.documents < 0 or not all(
                    isinstance(h, str) and len(h) == 64 for h in (s.sha256, s.edges_sha256)):
                self._refuse(f"shard {s.name}: documents {shown(s.documents)}, sha256 {shown(s.sha256)}, edges_sha256 "
                             f"{shown(s.edges_sha256)} (a count and two hex sha256 digests)")
        for split in SPLITS:
            shards = self.split(split)
            have = {"tokens": sum(s.tokens for s in shards), "documents": sum(s.documents for s in shards),
                    "shards": len(shards)}
            told = {k: totals[split].get(k) if isinstance(totals[split], dict) else None for k in have}
            if told != have:
                self._refuse(f"totals.{split} is {told}, its shards add up to {have}")

    def check_files(self) -> None:
        """Every listed shard is there with its size and the fingerprint of its two ends, and no other shard is:
        what train checks at start, so a shard swapped for a same-size one of another dataset is refused without
        reading the dataset (a stat and two 4 KiB reads per shard; `prep verify` reads every byte)."""
        if self._files_checked:
            return
        listed = {s.name for s in self.shards}
        with os.scandir(self.path) as entries:
            on_disk = sorted(e.name for e in entries if SHARD_NAME.fullmatch(e.name))
        for name in on_disk:
            if name not in listed:
                raise DatasetError(f"{self.path / name}: a shard that {self.manifest_path} does not list; remove "
                                   f"it, or prepare the dataset again")
        for s in self.shards:
            path = self.path / s.name
            try:
                size, edges = edges_sha256(path)
            except FileNotFoundError:
                raise DatasetError(f"{self.manifest_path}: lists {s.name}, which is missing from {self.path}; "
                                   f"prepare the dataset again") from None
            except OSError as exc:
                raise DatasetError(f"{path}: cannot read shard ({exc.strerror})") from None
            if size != s.bytes:
                raise DatasetError(f"{path}: {size:,} bytes, {self.manifest_path} says {s.bytes:,}; the shard "
                                   f"was truncated or replaced: prepare the dataset again")
            if edges != s.edges_sha256:
                raise DatasetError(f"{path}: its first and last {EDGE_BYTES >> 10} KiB do not match "
                                   f"{self.manifest_path} (a shard of another dataset, or modified); `python -m "
                                   f"prep verify {self.path}` checks every shard whole")
        self._files_checked = True

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
        self.check_files()
        return [self.open(s) for s in self.split(split)]

    def files(self, split: str) -> list["ShardFile"]:
        """Every shard of `split` opened for positional reads (what the training loader uses), once every shard
        of the dataset matches the manifest (check_files) and its header agrees."""
        self.check_files()
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
