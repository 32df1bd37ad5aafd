"""`prep tokenize`: turn input units into committed token files under DS/.work/, then (alone) finalize.

Each unit is tokenized by one worker into .work/units/uNNNNNN.bin (tokens, shard format) and uNNNNNN.idx.npy
(per document: holdout hash and token count), then uNNNNNN.json is written last as the done marker. A unit with a
marker is never redone, so a rerun after SIGKILL picks up where the last run stopped; a unit cut off half-way left
only temporary files, which are ignored. The layout of .work/ and its locks are prep.workdir's.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import cli, files, progress, tokenizer
from common.errors import PipelineError
from common.process import die_with_parent, ignore_sigint, sigint_held

from . import finalize as fin
from . import recipe as recipes
from .inputs import ReadStats, Unit, check_unchanged, read_documents, stable_hash
from .reader import MANIFEST
from .shard import make_header, to_uint16
from .workdir import INDEX_DTYPE, check_out_dir, dataset_lock, is_done, task_lock, unit_paths, work_dir


class WorkerDied(PipelineError):
    """A worker process was killed (out-of-memory killer, a signal) while tokenizing."""


class Interrupted(PipelineError):
    """Ctrl-C (SIGINT) while tokenizing: the workers are ended, the units committed so far kept."""
    exit_code = cli.INTERRUPTED_EXIT


@dataclass(frozen=True)
class UnitJob:
    out: str
    unit: Unit
    text_column: str
    skip_bad: bool
    seed: int
    expect: dict  # the input file's fingerprint in the recipe: its content must not change under the worker


_progress_queue = None  # set in each pool worker by _init_worker; None when running in-process


def _init_worker(progress_queue, parent_pid: int) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    die_with_parent(parent_pid)
    # A worker interrupted inside a queue's lock left the parent waiting on it for ever, holding DS/.work/lock:
    # the parent alone acts on Ctrl-C, and ends the workers itself.
    ignore_sigint()


def tokenize_unit(job: UnitJob, report=None) -> dict:
    """Tokenize one unit and commit it; returns the done-marker contents. report((docs, tokens)) shows progress."""
    report = report or (_progress_queue.put if _progress_queue is not None else None)
    enc = tokenizer.get_encoding()
    eot = np.array([tokenizer.EOT_TOKEN], dtype=np.uint32)
    paths = unit_paths(Path(job.out), job.unit.index)
    stats = ReadStats()
    hashes: list[int] = []
    lengths: list[int] = []
    digest = hashlib.sha256()
    n_tokens = 0
    # The recipe fixed the input's content; a unit read from a newer version must not mix with older ones.
    changed = (f"the units tokenized before read the old content: tokenize into a new --out, or delete "
               f"{work_dir(Path(job.out))} and tokenize again")
    check_unchanged(job.unit.path, job.expect, changed)
    with files.atomic_file(paths["tokens"]) as f:
        f.write(make_header(0))  # patched with the real count once the unit is complete
        for batch in read_documents(job.unit, job.text_column, job.skip_bad, stats):
            pieces = []
            for key, text in batch:
                if not text:
                    stats.empty += 1
                    continue
                # encode_to_numpy with no special tokens allowed or disallowed == encode_ordinary, minus a list copy.
                ids = enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
                pieces += (eot, ids)
                hashes.append(stable_hash(text if key is None else key, job.seed))
                lengths.append(len(ids) + 1)
            stats.documents += len(pieces) // 2
            if not pieces:
                continue
            chunk = to_uint16(np.concatenate(pieces), job.unit.describe())  # little-endian uint16, contiguous
            f.write(chunk.data)
            digest.update(chunk.data)
            n_tokens += len(chunk)
            if report:
                report((len(pieces) // 2, len(chunk)))
        f.seek(0)
        f.write(make_header(n_tokens))
        check_unchanged(job.unit.path, job.expect, changed)  # before the unit is committed, not after
    index = np.array(list(zip(hashes, lengths)), dtype=INDEX_DTYPE)
    with files.atomic_file(paths["index"]) as f:
        np.save(f, index)
    marker = {"unit": job.unit.to_dict(), "tokens": n_tokens, "documents": len(lengths),
              "tokens_sha256": digest.hexdigest(), "stats": stats.to_dict(), "bad_examples": stats.bad_examples}
    files.write_json(paths["done"], marker)
    return marker


def run_units(out: Path, units: list[Unit], rcp: dict, workers: int, label: str) -> tuple[ReadStats, int]:
    """Tokenize the given units with `workers` processes, showing one progress bar; returns (stats, tokens)."""
    tokenizer.get_encoding()  # load the BPE once, before forking, rather than once per worker
    inputs = {f["path"]: f for f in rcp["inputs"]}
    jobs = [UnitJob(str(out), u, rcp["text_column"], rcp["skip_bad_docs"], rcp["validation"]["seed"], inputs[u.path])
            for u in units]
    total = ReadStats()
    bar = progress.bar(total=len(jobs), desc=label, unit="unit")
    counts = {"docs": 0, "tokens": 0, "committed": 0, "shown": 0.0}
    start = time.monotonic()

    def on_progress(delta):
        counts["docs"] += delta[0]
        counts["tokens"] += delta[1]
        now = time.monotonic()
        if now - counts["shown"] >= 1.0:  # rates between unit completions, at most once a second
            counts["shown"] = now
            dt = max(now - start, 1e-9)
            bar.set_postfix_str(f"{counts['docs'] / dt:,.0f} docs/s, {counts['tokens'] / dt:,.0f} tok/s")

    def on_done(marker):
        stats = ReadStats(**{k: marker["stats"][v] for k, v in
                             (("documents", "documents"), ("empty", "empty_skipped"), ("bad", "bad_skipped"),
                              ("invalid_utf8", "invalid_utf8_replaced"))})
        stats.bad_examples = marker["bad_examples"]
        total.add(stats)
        counts["committed"] += marker["tokens"]
        bar.update(1)

    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                on_done(tokenize_unit(job, on_progress))
        else:
            _run_pool(jobs, workers, on_progress, on_done)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; the units committed so far are kept: rerun the same command to resume "
                          "(it skips them)") from None
    finally:
        bar.close()
    return total, counts["committed"]


def _run_pool(jobs, workers, on_progress, on_done) -> None:
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker killed by the OOM killer raises BrokenProcessPool here
    # instead of leaving the parent waiting forever for the lost unit.
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    progress_queue = ctx.Queue()
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                               initargs=(progress_queue, os.getpid()))
    try:
        with sigint_held():  # the workers are forked here
            pending = {pool.submit(tokenize_unit, job) for job in jobs}
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while True:
                try:
                    on_progress(progress_queue.get_nowait())
                except queue.Empty:
                    break
            for future in done:
                on_done(future.result())  # re-raises the worker's error (bad input, disk full, ...)
    except BrokenProcessPool:
        raise WorkerDied("a tokenize worker process died (killed by a signal, often the out-of-memory killer: "
                         "fewer --workers use less memory); the units committed so far are kept: rerun the same "
                         "command to resume") from None
    except KeyboardInterrupt:
        # Now, not once the running units are done (one can take minutes): a unit cut off leaves only temporary
        # files, and the rerun redoes it. Before the dataset lock is released, which the workers hold too; a
        # second Ctrl-C must not cut that short.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            _end_workers()
        finally:
            signal.signal(signal.SIGINT, previous)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on error: let running units finish, start no more


def _end_workers() -> None:
    """SIGTERM every worker (this process starts no other children), SIGKILL one still there after a few seconds,
    and return once all are gone."""
    workers = mp.active_children()
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(5)
        if worker.exitcode is None:
            worker.kill()
            worker.join()


def tokenize(args) -> int:
    """The `prep tokenize` command: plan, check the recipe, tokenize this task's units, finalize when alone."""
    out = Path(args.out).resolve()
    rcp, units, skipped = recipes.build(args)
    check_out_dir(out)
    if (out / MANIFEST).exists() and not work_dir(out).exists():
        return fin.already_finished(out, rcp)  # reads only: no lock needed
    source = fin.source_of(rcp)
    for part in source.get("parts", [source]):
        if part.get("files_used", 0) < part.get("files_listed", 0):
            print(f"warning: the download of {part['repo_id']} {part['pattern']} lists {part['files_listed']} files, "
                  f"the inputs hold {part['files_used']} of them (download unfinished, or a --files subset)",
                  file=sys.stderr)
    task_mode = args.task_count is not None
    task_index, task_count = (args.task_index, args.task_count) if task_mode else (0, 1)
    # Array tasks share the directory (each its own units); a whole tokenize, which finalizes too, is alone.
    with dataset_lock(out, args.wait, shared=task_mode):
        if (out / MANIFEST).exists():  # finished while this process waited for the lock
            return fin.already_finished(out, rcp, clean=not task_mode)
        recipes.claim_work_dir(out, rcp, units, skipped)
        if not task_mode:
            _tokenize_share(out, rcp, units, args.workers, 0, 1)
            return fin.finalize_locked(out)
        with task_lock(out, task_index, task_count, args.wait):
            _tokenize_share(out, rcp, units, args.workers, task_index, task_count)
    print(f"run `python -m prep finalize --out {out}` once every task has finished", file=sys.stderr)
    return 0


def _tokenize_share(out: Path, rcp: dict, units: list, workers: int, task_index: int, task_count: int) -> None:
    mine = [u for u in units if u.index % task_count == task_index]
    done = [u for u in mine if is_done(out, u)]
    todo = [u for u in mine if not is_done(out, u)]
    recipes.print_config(out, rcp, units, workers, task_index, task_count, len(done))
    if done:
        shown = ", ".join(f"u{u.index:06d}" for u in done[:8]) + (" ..." if len(done) > 8 else "")
        print(f"skipping {len(done)} unit(s) already done: {shown}", file=sys.stderr)
    start = time.monotonic()
    stats, n_tokens = run_units(out, todo, rcp, workers, f"tokenize task {task_index}/{task_count}")
    dt = time.monotonic() - start
    print(f"task {task_index}/{task_count}: {len(todo)} unit(s) tokenized, {len(done)} skipped as done; "
          f"{stats.documents:,} documents, {n_tokens:,} tokens in {dt:.1f}s ({n_tokens / max(dt, 1e-9):,.0f} tok/s); "
          f"empty {stats.empty}, bad {stats.bad}, invalid UTF-8 {stats.invalid_utf8}", file=sys.stderr)
    for example in stats.bad_examples:
        print(f"  skipped: {example}", file=sys.stderr)
