"""Read a finished dataset directory (contract 1): what train/ and eval/ use."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import PipelineError

from .shard import ShardError, open_shard

MANIFEST = "manifest.json"


class DatasetError(PipelineError):
    """A directory that is not a usable dataset; the message says why."""


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
        try:
            self.manifest = json.loads(manifest_path.read_text())
            self.shards = [ShardInfo(**{k: s[k] for k in ShardInfo.__dataclass_fields__})
                           for s in self.manifest["shards"]]
            tok = self.manifest["tokenizer"]
            self.n_vocab, self.eot = int(tok["n_vocab"]), int(tok["eot"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{manifest_path}: malformed manifest ({exc})") from None

    def split(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def open(self, shard: ShardInfo) -> np.ndarray:
        """Memory-map one shard; its header must agree with the manifest."""
        tokens = open_shard(self.path / shard.name)
        if len(tokens) != shard.tokens:
            raise ShardError(f"{self.path / shard.name}: {len(tokens)} tokens, manifest says {shard.tokens}")
        return tokens

    def arrays(self, split: str) -> list[np.ndarray]:
        return [self.open(s) for s in self.split(split)]
