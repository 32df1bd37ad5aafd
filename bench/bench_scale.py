"""The training loader at FineWeb scale, simulated: start-up, memory per rank, and data wait with a cold page cache.

    .venv/bin/python bench/bench_scale.py [--sizes 10e9 100e9 350e9] [--ranks 8] [--micro-batch 16] [--seq-len 1024]
        [--cold-gb 4] [--cold-ranks 1 8] [--step-ms 30] [--step-python-ms 10] [--cold-steps 300] [--legacy]

1. Start-up and RSS: for each size, a dataset of 100M-token shards whose token files are sparse (a valid header,
   then a hole made by truncate), so 350B tokens take no disk; its manifest is what finalize writes. Each of
   --ranks processes (rank r of --ranks, one after another) opens the dataset, builds the TrainLoader and takes
   its first micro batch (start-up), then 50 more; it reports the start-up time and the growth of its peak RSS
   over what it had after its imports. --legacy also times one rank with the order the loader had before
   (numpy's permutation of every window, as checkpoints of that loader still resume with).
2. Data wait: a real dataset of --cold-gb GB of random tokens (written, then deleted at the end), the page cache
   dropped before each row (echo 3 > /proc/sys/vm/drop_caches; needs root, else the row says "warm"), then
   --cold-ranks processes at once each run --cold-steps simulated steps of --step-ms: --step-python-ms of it
   spinning in Python (holding the GIL, as an eager GPU loop does while it launches kernels; lowered so that all
   ranks' spinning fits half the cores), the rest asleep (as a loop blocked in a CUDA synchronize, which releases
   the GIL). Reported: the time next() kept the step waiting, as a share of the step's time, for three loaders: the
   old one (memory-mapped shards, the batch gathered on the training thread), pread on the training thread
   (prefetch 0), and the loader as it is (pread, PREFETCH batches ahead).
Also printed: what the vocabulary check and the epoch order cost per micro batch.
Everything is written under a temporary directory (or --work) and removed at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from common import files  # noqa: E402
from prep.reader import DATASET_VERSION  # noqa: E402
from prep.shard import HEADER_BYTES, edges_sha256, make_header  # noqa: E402
from train.data import PREFETCH  # noqa: E402

SHARD_TOKENS = 100_000_000
N_VOCAB, EOT = 50257, 50256


# ---- synthetic datasets ---------------------------------------------------------------------------------------
def write_manifest(out: Path, shards: list[dict]) -> None:
    totals = {split: {"tokens": sum(s["tokens"] for s in shards if s["split"] == split),
                      "documents": sum(s["documents"] for s in shards if s["split"] == split),
                      "shards": sum(1 for s in shards if s["split"] == split)} for split in ("train", "val")}
    files.write_json(out / "manifest.json", {
        "dataset_version": DATASET_VERSION,
        "format": {"name": "llm.c token shards", "version": 1, "magic": 20240520, "header_bytes": HEADER_BYTES,
                   "dtype": "uint16 little-endian", "sha256_of": "whole file (header + tokens)"},
        "tokenizer": {"name": "gpt2", "n_vocab": N_VOCAB, "eot": EOT, "eot_placement": "prepend"},
        "source": {"synthetic": "bench/bench_scale.py"}, "totals": totals, "shards": shards,
        "created_by": "bench/bench_scale.py"})


def zero_shard_sha256(tokens: int) -> str:
    """The sha256 of a sparse shard (header, then zeros), streamed: every sparse shard of one size shares it."""
    h = hashlib.sha256(make_header(tokens))
    zeros, left = bytes(1 << 24), 2 * tokens
    while left:
        h.update(zeros[:min(left, len(zeros))])
        left -= min(left, len(zeros))
    return h.hexdigest()


def sparse_dataset(out: Path, total_tokens: int) -> Path:
    out.mkdir(parents=True)
    n_shards = max(1, round(total_tokens / SHARD_TOKENS))
    sha = zero_shard_sha256(SHARD_TOKENS)
    shards = []
    for split, count in (("train", n_shards), ("val", 1)):
        for k in range(count):
            name = f"{split}_{k:06d}.bin"
            with open(out / name, "wb") as f:
                f.write(make_header(SHARD_TOKENS))
                f.truncate(HEADER_BYTES + 2 * SHARD_TOKENS)
            shards.append({"name": name, "split": split, "tokens": SHARD_TOKENS, "documents": 1, "sha256": sha,
                           "bytes": HEADER_BYTES + 2 * SHARD_TOKENS, "edges_sha256": edges_sha256(out / name)[1]})
    write_manifest(out, shards)
    return out


def dense_dataset(out: Path, gigabytes: float) -> Path:
    """Random tokens below the vocabulary, really on disk: cold reads need real blocks."""
    from prep.shard import write_shard
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_tokens, plan = int(gigabytes * 1e9 / 2), []
    for k, start in enumerate(range(0, train_tokens, SHARD_TOKENS)):
        plan.append((f"train_{k:06d}.bin", "train", min(SHARD_TOKENS, train_tokens - start)))
    plan.append(("val_000000.bin", "val", 1_000_000))
    shards = []
    for name, split, n in plan:
        tokens = rng.integers(0, N_VOCAB, n, dtype=np.uint16)
        write_shard(out / name, tokens)
        sha = hashlib.sha256(make_header(n) + tokens.tobytes()).hexdigest()
        shards.append({"name": name, "split": split, "tokens": n, "documents": 1, "sha256": sha,
                       "bytes": HEADER_BYTES + 2 * n, "edges_sha256": edges_sha256(out / name)[1]})
    write_manifest(out, shards)
    return out


# ---- measurements in a fresh process per rank ------------------------------------------------------------------
def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child_startup(args) -> dict:
    from prep.reader import Dataset
    from train.data import TrainLoader
    before = rss_kib("VmRSS")
    started = time.perf_counter()
    loader = TrainLoader(Dataset(args.dataset), args.micro_batch, args.seq_len, args.rank, args.world, seed=1337)
    if args.order != loader.order_name:
        loader.order_name = args.order
    loader.next()
    startup = time.perf_counter() - started
    for _ in range(50):
        loader.next()
    loader.close()
    return {"startup_s": startup, "rss_growth_mib": (rss_kib("VmRSS") - before) / 1024,
            "peak_rss_growth_mib": (rss_kib("VmHWM") - before) / 1024}


def child_cold(args) -> dict:
    from prep.reader import Dataset
    from train.data import TrainLoader
    loader = TrainLoader(Dataset(args.dataset), args.micro_batch, args.seq_len, args.rank, args.world, seed=1337,
                         prefetch=args.prefetch)
    if args.reader == "mmap":
        loader.dataset_arrays = Dataset(args.dataset).arrays("train")
    next_batch = loader.next if args.reader == "pread" else old_reader(loader)
    waits, steps = [], []
    for _ in range(args.steps):
        begin = time.perf_counter()
        next_batch()
        waits.append(time.perf_counter() - begin)
        spin_until = time.perf_counter() + args.step_python_ms / 1e3
        while time.perf_counter() < spin_until:  # the Python part of a step: holds the GIL
            pass
        time.sleep(max(0.0, (args.step_ms - args.step_python_ms) / 1e3))
        steps.append(time.perf_counter() - begin)
    loader.close()
    waits, steps = np.array(waits[1:]), np.array(steps[1:])  # the first batch is start-up, not steady state
    return {"wait_share": float(waits.sum() / steps.sum()), "wait_p50_ms": float(np.median(waits) * 1e3),
            "wait_p99_ms": float(np.percentile(waits, 99) * 1e3), "step_ms": float(steps.mean() * 1e3)}


def old_reader(loader):
    """The loader before background reads: memory-mapped shards, the batch gathered on the training thread."""
    import torch
    arrays = loader.dataset_arrays
    offsets, T = loader.index.offsets, loader.index.seq_len

    def next_batch():
        windows = loader.next_windows()
        shard = np.searchsorted(offsets, windows, side="right") - 1
        starts = (windows - offsets[shard]) * T
        rows = torch.from_numpy(np.stack([arrays[s][st: st + T + 1] for s, st in zip(shard, starts)]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]
    return next_batch


def run_children(mode: str, dataset: Path, ranks: list[int], world: int, args, parallel: bool, **extra) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", mode, "--dataset", str(dataset), "--world", str(world),
           "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    procs, results = [], []
    for rank in ranks:
        p = subprocess.Popen(cmd + ["--rank", str(rank)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if parallel:
            procs.append(p)
        else:
            results.append(json.loads(p.communicate()[0]))
            if p.returncode:
                sys.exit(f"{mode} rank {rank} failed")
    for p in procs:
        results.append(json.loads(p.communicate()[0]))
        if p.returncode:
            sys.exit(f"{mode} failed")
    return results


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def per_batch_costs(args) -> tuple[float, float]:
    """Microseconds per micro batch: the vocabulary check (max over the batch) and the epoch order (amortised)."""
    import timeit

    from train.data import ORDER_CHUNK, FeistelOrder
    rows = np.random.default_rng(0).integers(0, N_VOCAB, (args.micro_batch, args.seq_len + 1), dtype=np.uint16)
    check = min(timeit.repeat(lambda: int(rows.max()) >= N_VOCAB, number=1000, repeat=5)) / 1000
    order = FeistelOrder(int(350e9 / args.seq_len), 1337, 0)
    positions = np.arange(ORDER_CHUNK * args.micro_batch)
    chunk = min(timeit.repeat(lambda: order(positions), number=20, repeat=5)) / 20
    return check * 1e6, chunk / ORDER_CHUNK * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[10e9, 100e9, 350e9], help="dataset tokens")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--legacy", action="store_true", help="also time the old numpy-permutation order (one rank)")
    p.add_argument("--cold-gb", type=float, default=4.0, help="size of the real dataset for cold reads (0: skip)")
    p.add_argument("--cold-ranks", type=int, nargs="+", default=[1, 8], help="processes reading at once")
    p.add_argument("--cold-steps", type=int, default=300)
    p.add_argument("--step-ms", type=float, default=30.0)
    p.add_argument("--step-python-ms", type=float, default=10.0)
    p.add_argument("--work", type=Path, default=None, help="where the synthetic datasets go (default: a temp dir)")
    # one rank's measurement, in its own process
    p.add_argument("--child", choices=("startup", "cold"), help=argparse.SUPPRESS)
    p.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--order", default="feistel", help=argparse.SUPPRESS)
    p.add_argument("--prefetch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=300, help=argparse.SUPPRESS)
    p.add_argument("--reader", choices=("pread", "mmap"), default="pread", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_startup(args) if args.child == "startup" else child_cold(args)))
        return 0

    made = Path(tempfile.mkdtemp(prefix="bench_scale-", dir=args.work))
    try:
        print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, nproc {os.cpu_count()}, "
              f"RAM {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB, "
              f"micro batch {args.micro_batch} x {args.seq_len + 1} tokens, {args.ranks} ranks", flush=True)
        print("\n| dataset tokens | shards | order | ranks | start-up s (max over ranks) | peak RSS growth MiB "
              "(max) | RSS growth after 51 batches MiB (max) |\n|---|---:|---|---:|---:|---:|---:|", flush=True)
        for size in args.sizes:
            ds = sparse_dataset(made / f"sparse-{size:.0e}", int(size))
            runs = [("feistel", list(range(args.ranks)))] + ([("permutation", [0])] if args.legacy else [])
            for order, ranks in runs:
                res = run_children("startup", ds, ranks, args.ranks, args, parallel=False, order=order)
                print(f"| {size / 1e9:g}B | {round(size / SHARD_TOKENS)} | {order} | {len(ranks)} | "
                      f"{max(r['startup_s'] for r in res):.2f} | {max(r['peak_rss_growth_mib'] for r in res):.1f} | "
                      f"{max(r['rss_growth_mib'] for r in res):.1f} |", flush=True)
            shutil.rmtree(ds)
        check_us, order_us = per_batch_costs(args)
        print(f"\nper micro batch: vocabulary check {check_us:.1f} us, epoch order {order_us:.1f} us "
              f"(350B-token domain, amortised over a chunk)", flush=True)
        if args.cold_gb > 0:
            ds = dense_dataset(made / "dense", args.cold_gb)
            print(f"\ncold reads: {args.cold_gb:g} GB of random tokens, step {args.step_ms:g} ms\n\n"
                  "| loader | ranks at once | Python ms of the step | page cache | data wait / step time "
                  "(max over ranks) | wait p50 ms | wait p99 ms | step ms |\n"
                  "|---|---:|---:|---|---:|---:|---:|---:|", flush=True)
            loaders = (("old: mmap, on the training thread", "mmap", 0), ("pread, on the training thread", "pread", 0),
                       (f"pread, {PREFETCH} batches ahead (now)", "pread", PREFETCH))
            for ranks in args.cold_ranks:
                # The spinning part of each step must fit the machine's cores, or the rows measure CPU contention.
                python_ms = min(args.step_python_ms, args.step_ms * 0.5 * os.cpu_count() / ranks)
                for label, reader, prefetch in loaders:
                    cold = drop_page_cache()
                    res = run_children("cold", ds, list(range(ranks)), max(ranks, args.ranks), args, parallel=True,
                                       prefetch=prefetch, steps=args.cold_steps, step_ms=args.step_ms,
                                       step_python_ms=python_ms, reader=reader)
                    worst = max(res, key=lambda r: r["wait_share"])
                    print(f"| {label} | {ranks} | {python_ms:.1f} | {'dropped' if cold else 'warm'} | "
                          f"{100 * worst['wait_share']:.2f}% | {worst['wait_p50_ms']:.2f} | "
                          f"{worst['wait_p99_ms']:.2f} | {worst['step_ms']:.1f} |", flush=True)
    finally:
        shutil.rmtree(made)
    return 0


if __name__ == "__main__":
    sys.exit(main())
