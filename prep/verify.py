"""`prep verify DS` (re-check every shard against the manifest) and `prep info DS` (print the summary)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from common import progress

from .reader import Dataset
from .shard import HEADER_BYTES, ShardError, read_header

CHUNK_TOKENS = 1 << 24


def verify(path: Path) -> int:
    """Raise ShardError naming the first bad shard; return 0 when all shards match the manifest."""
    ds = Dataset(path)
    total = sum(s.tokens for s in ds.shards)
    with progress.bar(total=total, desc="verify", unit="tok", unit_scale=True) as bar:
        for shard in ds.shards:
            check_shard(ds, shard, bar.update)
    print(f"ok: {len(ds.shards)} shard(s), {total:,} tokens match {ds.path / 'manifest.json'}")
    return 0


def check_shard(ds: Dataset, shard, progress=None) -> None:
    file = ds.path / shard.name
    n = read_header(file)  # magic, version, size == 1024 + 2n
    if n != shard.tokens:
        raise ShardError(f"{file}: header says {n} tokens, manifest says {shard.tokens}")
    digest = hashlib.sha256()
    docs = 0
    with open(file, "rb") as f:
        digest.update(f.read(HEADER_BYTES))
        while chunk := f.read(2 * CHUNK_TOKENS):
            digest.update(chunk)
            tokens = np.frombuffer(chunk, dtype="<u2")
            if len(tokens) and int(tokens.max()) >= ds.n_vocab:
                raise ShardError(f"{file}: token id {int(tokens.max())} >= n_vocab {ds.n_vocab}")
            docs += int(np.count_nonzero(tokens == ds.eot))
            if progress:
                progress(len(tokens))
    if digest.hexdigest() != shard.sha256:
        raise ShardError(f"{file}: sha256 {digest.hexdigest()[:16]}... does not match the manifest's "
                         f"{shard.sha256[:16]}...")
    if docs != shard.documents:
        raise ShardError(f"{file}: {docs} documents start here, manifest says {shard.documents}")


def info(path: Path) -> int:
    ds = Dataset(path)
    m = ds.manifest
    tok = m["tokenizer"]
    rows = [("dataset", str(ds.path)),
            ("source", ", ".join(f"{k}={v}" for k, v in m.get("source", {}).items() if v is not None)),
            ("inputs", f"{len(m.get('inputs', []))} file(s), {sum(f['bytes'] for f in m.get('inputs', [])) / 1e6:,.1f} MB"),
            ("tokenizer", f"{tok['name']} (n_vocab {tok['n_vocab']}, EOT {tok['eot']} {tok.get('eot_placement', '')})")]
    for split in ("train", "val"):
        shards = ds.split(split)
        rows.append((split, f"{sum(s.tokens for s in shards):,} tokens, {sum(s.documents for s in shards):,} "
                            f"documents, {len(shards)} shard(s)"))
    if "validation" in m:
        rows.append(("val rule", f"seed {m['validation']['seed']}, requested {m['validation']['requested_tokens']:,} "
                                 f"tokens: {m['validation']['rule']}"))
    if "input_stats" in m:
        st = m["input_stats"]
        rows.append(("documents in", f"{st['documents']:,} (empty skipped {st['empty_skipped']}, bad skipped "
                                     f"{st['bad_skipped']}, invalid UTF-8 replaced {st['invalid_utf8_replaced']})"))
    if "recipe" in m:
        rows.append(("shard tokens", f"{m['recipe']['shard_tokens']:,}"))
    rows.append(("created by", m.get("created_by", "?")))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0
