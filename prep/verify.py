"""`prep verify DS` (re-check every shard against the manifest) and `prep info DS` (print the summary).

Verify reads, hashes and range-checks every byte, so at FineWeb scale (700 GB) it runs in worker processes, one
whole shard each at a time. Shards are handed out in manifest order, one per worker, and none after a shard found
bad; a worker whose shard comes after the first bad one known stops within one chunk. The shard reported is the
first bad one in manifest order, as in one process, whatever order the workers finish in: every shard before it
has been checked whole by then.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from common import cli, progress
from common.errors import PipelineError
from common.process import die_with_parent, ignore_sigint, sigint_held

from .reader import Dataset, DatasetError
from .shard import HEADER_BYTES, ShardError, read_header

CHUNK_TOKENS = 1 << 24


class WorkerDied(PipelineError):
    pass


def verify(path: Path, workers: int | None = None) -> int:
    """Raise ShardError naming the first bad shard; return 0 when all shards match the manifest.

    workers: processes checking shards (None: the CPUs this process may use); never more than the shards; 1 checks
    in this process.
    """
    ds = Dataset(path)
    total = sum(s.tokens for s in ds.shards)
    workers = min(workers or len(os.sched_getaffinity(0)), len(ds.shards))
    with progress.bar(total=total, desc="verify", unit="tok", unit_scale=True) as bar:
        if workers <= 1:
            buffer = read_buffer(ds)
            for shard in ds.shards:
                check_shard(ds, shard, bar.update, buffer)
        else:
            check_in_pool(ds, workers, bar.update)
    # What train checks at start (edges_sha256, no unlisted shard): "ok" here must mean train accepts the dataset.
    ds.check_files()
    print(f"ok: {len(ds.shards)} shard(s), {total:,} tokens match {ds.path / 'manifest.json'}")
    return 0


def read_buffer(ds: Dataset) -> memoryview:
    """One buffer for every chunk of every shard a process checks: a fresh 32 MB object per chunk made verify about
    a quarter slower (page faults), and a zeroed one per shard cost more than checking a small shard. Not zeroed:
    each read overwrites what it returns."""
    tokens = min(CHUNK_TOKENS, max((s.tokens for s in ds.shards), default=0))
    return memoryview(np.empty(2 * max(tokens, 1), dtype=np.uint8))


def check_shard(ds: Dataset, shard, progress=None, buffer: memoryview | None = None) -> None:
    file = ds.path / shard.name
    n = read_header(file)  # magic, version, size == 1024 + 2n
    if n != shard.tokens:
        raise ShardError(f"{file}: header says {n} tokens, manifest says {shard.tokens}")
    digest = hashlib.sha256()
    docs = 0
    if buffer is None:
        buffer = read_buffer(ds)
    with open(file, "rb") as f:
        digest.update(f.read(HEADER_BYTES))
        while got := f.readinto(buffer):
            chunk = buffer[:got]
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


_worker = None  # (dataset, tokens checked, first bad index, read buffer) in each pool worker, set by _init_worker


def _init_worker(ds: Dataset, checked, first_bad, parent_pid: int) -> None:
    die_with_parent(parent_pid)  # orphaned, a worker would wait on the pool's queue for ever
    # The parent alone acts on Ctrl-C (it stops the workers within a chunk), so an idle worker does not die
    # printing its own traceback.
    ignore_sigint()
    global _worker
    _worker = (ds, checked, first_bad, read_buffer(ds))


class _Stopped(Exception):
    """Raised inside a worker whose shard comes after one found bad: its outcome can no longer matter."""


def _check_in_worker(index: int) -> None:
    ds, checked, first_bad, buffer = _worker

    def report(tokens: int) -> None:
        with checked.get_lock():
            checked.value += tokens
        if first_bad.value < index:
            raise _Stopped

    if first_bad.value < index:
        return
    try:
        check_shard(ds, ds.shards[index], report, buffer)
    except _Stopped:
        pass


def check_in_pool(ds: Dataset, workers: int, update) -> None:
    """check_shard on every shard with `workers` processes; raise the error of the first bad one in manifest order."""
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker killed by a signal raises BrokenProcessPool here
    # instead of leaving the parent waiting forever for its shard.
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    checked = ctx.Value("q", 0)
    first_bad = ctx.Value("q", len(ds.shards))  # written by this process only; workers stop on shards after it
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                              initargs=(ds, checked, first_bad, os.getpid()))
    running: dict = {}
    errors: dict[int, BaseException] = {}
    following, shown = 0, 0
    try:
        while True:
            # Exactly one shard per worker in flight, none queued: once a shard is bad, no later one starts.
            while len(running) < workers and following < first_bad.value:
                with sigint_held():  # the workers are forked at the first submit
                    running[pool.submit(_check_in_worker, following)] = following
                following += 1
            if not running:
                break
            done, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in done:
                index = running.pop(future)
                if future.exception() is not None:
                    errors[index] = future.exception()
                    first_bad.value = min(first_bad.value, index)
            shown = _show(checked, shown, update)
        if errors:
            raise errors[min(errors)]
    except BrokenProcessPool:
        raise WorkerDied(f"{ds.path}: a verify worker process died (killed by a signal); nothing was written: "
                         f"rerun the same command") from None
    finally:
        first_bad.value = -1  # after an error or Ctrl-C: stop every shard still being read
        pool.shutdown(wait=True, cancel_futures=True)


def _show(checked, shown: int, update) -> int:
    now = checked.value
    if now > shown:
        update(now - shown)
    return now


def info(path: Path) -> int:
    ds = Dataset(path)
    try:
        rows = _info_rows(ds)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # fields Dataset itself does not need
        raise DatasetError(f"{ds.manifest_path}: malformed manifest ({type(exc).__name__}: {exc})") from None
    print(cli.table(rows))
    return 0


def _info_rows(ds: Dataset) -> list:
    m = ds.manifest
    tok = m["tokenizer"]
    inputs, stats, val = m["inputs"], m["input_stats"], m["validation"]
    rows = [("dataset", str(ds.path)),
            ("source", ", ".join(f"{k}={v}" for k, v in m["source"].items() if v is not None)),
            ("inputs", f"{len(inputs)} file(s), {sum(f['bytes'] for f in inputs) / 1e6:,.1f} MB"),
            ("tokenizer", f"{tok['name']} (n_vocab {tok['n_vocab']}, EOT {tok['eot']} {tok['eot_placement']})")]
    for split in ("train", "val"):
        shards = ds.split(split)
        rows.append((split, f"{sum(s.tokens for s in shards):,} tokens, {sum(s.documents for s in shards):,} "
                            f"documents, {len(shards)} shard(s)"))
    rows += [("val rule", f"seed {val['seed']}, requested {val['requested_tokens']:,} tokens: {val['rule']}"),
             ("documents in", f"{stats['documents']:,} (empty skipped {stats['empty_skipped']}, bad skipped "
                              f"{stats['bad_skipped']}, invalid UTF-8 replaced {stats['invalid_utf8_replaced']})"),
             ("shard tokens", f"{m['recipe']['shard_tokens']:,}"),
             ("created by", m["created_by"])]
    return rows
