"""Throughput of `prep verify` in one process against --workers N, and the wall time it projects for 350BT.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken .venv/bin/python bench/bench_verify.py --shards 8 --shard-tokens 25e6

A synthetic finished dataset stands in for a tokenized corpus: --shards real train shards (llm.c header, then
random token ids below the vocabulary with an EOT every --doc-tokens tokens on average) and a manifest with each
shard's tokens, documents and sha256, so verify does all of its work (header, size, sha256, range check, EOT
count) and passes. The runs alternate (1 worker, N workers, and with --baseline REPO one process of that
checkout's verify; then again) --repeats times, each timing verify alone, pool start included, from the page cache
(the shards were just written); Python's own start is left out: it does not grow with the dataset. Each run's CPU
seconds (the process and its workers) are printed beside its wall time: on a shared machine, CPU well under N x
wall means the workers waited for a core rather than for the code; and N independent processes that only hash,
timed against one, show how much N cores of this machine give at that moment, whatever verify does.

The projection for 350BT divides 350e9 tokens by N x the per-worker rate. That rate is the N-worker runs' tokens
per CPU second (what a worker with a core of its own checks, pool overhead included); on a shared machine the
N-worker wall rate / N is lower, and the projection at it is printed beside. Both assume the filesystem delivers
2 bytes a token to each worker.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prep import verify  # noqa: E402
from bench.bench_scale import write_manifest  # noqa: E402
from prep.shard import HEADER_BYTES, edges_sha256, write_shard  # noqa: E402

TARGET_TOKENS = 350e9
EOT = 50256


def build(out: Path, shards: int, shard_tokens: int, doc_tokens: int) -> int:
    """DS/ as finalize leaves it, with random shards; returns the tokens written."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for k in range(shards):
        tokens = rng.integers(0, EOT, size=shard_tokens, dtype=np.uint16)
        tokens[rng.random(shard_tokens) < 1 / doc_tokens] = EOT
        name = f"train_{k:06d}.bin"
        write_shard(out / name, tokens)
        entries.append({"name": name, "split": "train", "tokens": shard_tokens,
                        "documents": int(np.count_nonzero(tokens == EOT)),
                        "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(),
                        "bytes": HEADER_BYTES + 2 * shard_tokens, "edges_sha256": edges_sha256(out / name)[1]})
    write_manifest(out, entries)  # the manifest finalize writes, as prep.reader checks it
    return shards * shard_tokens


def cpu_seconds() -> float:
    """CPU time of this process and of its children reaped so far (the pool's workers, once it shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(out: Path, workers: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one verify; CPU well under workers x wall means the workers waited for a core."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        c0, t0 = cpu_seconds(), time.monotonic()
        verify.verify(out, workers)
        wall, cpu = time.monotonic() - t0, cpu_seconds() - c0
    assert sink.getvalue().count("ok: ") == 1, sink.getvalue()
    return wall, cpu


# verify(DS) with one process from another checkout's prep/, timed inside that process like timed() (its old
# signature had no workers argument).
BASELINE = """
import resource, sys, time
sys.path.insert(0, sys.argv[1])
from prep.verify import verify
t0 = time.monotonic()
verify(sys.argv[2])
wall, use = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(f"timed {wall} {use.ru_utime + use.ru_stime}", file=sys.stderr)
"""


def timed_baseline(repo: Path, out: Path) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-c", BASELINE, str(repo), str(out)], capture_output=True, text=True,
                          check=True)
    wall, cpu = done.stderr.rsplit("timed ", 1)[1].split()
    return float(wall), float(cpu)  # CPU includes the imports: an upper bound


# A fixed amount of pure hashing (sha256 is most of verify's time), run in separate processes.
HASH_LOOP = "import hashlib; b = bytes(1 << 25)\nfor _ in range(30): hashlib.sha256(b).digest()"


def hashing_ceiling(n: int) -> float:
    """How many times one process's hashing rate n independent processes reach together on this machine now."""
    def wall(k: int) -> float:
        t0 = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-c", HASH_LOOP]) for _ in range(k)]
        for proc in procs:
            proc.wait()
        return time.monotonic() - t0
    return n * wall(1) / wall(n)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard-tokens", type=float, default=25e6)
    p.add_argument("--doc-tokens", type=int, default=1000, help="mean tokens per document (FineWeb-Edu ~1000)")
    p.add_argument("--workers", type=int, default=2, help="the N run against one process (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternating (default 3)")
    p.add_argument("--project", type=int, nargs="+", default=[1, 2, 8, 16, 32, 64],
                   help="worker counts to project 350BT for")
    p.add_argument("--dir", type=Path, default=Path("/tmp/bench_verify"))
    p.add_argument("--baseline", type=Path,
                   help="also time one process of this checkout's prep verify (say, one before --workers existed)")
    args = p.parse_args()
    out = args.dir / "ds"
    total = build(out, args.shards, int(args.shard_tokens), args.doc_tokens)
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    print(f"{date}; {cpu_model()}, {len(os.sched_getaffinity(0))} usable CPUs; 1-min load before "
          f"{os.getloadavg()[0]:.1f}")
    print(f"synthetic dataset: {args.shards} shards x {int(args.shard_tokens):,} tokens = {total:,} tokens "
          f"({total * 2 / 1e9:.2f} GB), from the page cache")
    seconds = {1: [], args.workers: []}
    baseline = []
    for _ in range(args.repeats):
        for n in seconds:
            seconds[n].append(timed(out, n))
        if args.baseline:
            baseline.append(timed_baseline(args.baseline, out))
    shutil.rmtree(out, ignore_errors=True)
    ceiling = hashing_ceiling(args.workers)
    print(f"1-min load after {os.getloadavg()[0]:.1f}; {args.workers} independent sha256 loops reach {ceiling:.2f}x "
          f"one loop on this machine now (the most {args.workers} workers could gain)")
    print("| workers | wall (s), each run | CPU (s), each run | tokens/s (median wall) | x one process | "
          "tokens per CPU second (median) |")
    print("|---|---|---|---|---|---|")
    rates = {n: total / statistics.median(w for w, _ in runs) for n, runs in seconds.items()}
    per_cpu = {n: total / statistics.median(c for _, c in runs) for n, runs in seconds.items()}
    for n, runs in seconds.items():
        print(f"| {n} | {', '.join(f'{w:.2f}' for w, _ in runs)} | {', '.join(f'{c:.2f}' for _, c in runs)} | "
              f"{rates[n] / 1e6:,.1f}M | {rates[n] / rates[1]:.2f} | {per_cpu[n] / 1e6:,.1f}M |")
    if baseline:
        rate = total / statistics.median(w for w, _ in baseline)
        print(f"| 1, {args.baseline} | {', '.join(f'{w:.2f}' for w, _ in baseline)} | "
              f"{', '.join(f'{c:.2f}' for _, c in baseline)} (imports included) | {rate / 1e6:,.1f}M | "
              f"{rate / rates[1]:.2f} | - |")
    n = args.workers
    # A worker with a core of its own checks per_cpu[n] tokens a second (pool overhead included); rates[n] / n is
    # what each got here, sharing the machine.
    core, shared = per_cpu[n], rates[n] / n
    print(f"projection for 350BT ({TARGET_TOKENS / 1e8:,.0f} shards of 100M) with N workers, each on a core of its own "
          f"at {core / 1e6:,.1f}M tokens/s (tokens per CPU second with {n} workers), the filesystem delivering 2 bytes "
          f"a token to each; and at {shared / 1e6:,.1f}M tokens/s per worker (the {n}-worker wall rate / {n}, "
          f"what each got here):")
    print("| workers | projected wall (min) | reads needed (GB/s) | at the shared rate (min) |")
    print("|---|---|---|---|")
    for k in args.project:
        print(f"| {k} | {TARGET_TOKENS / (k * core) / 60:,.1f} | {2 * k * core / 1e9:,.1f} | "
              f"{TARGET_TOKENS / (k * shared) / 60:,.1f} |")

if __name__ == "__main__":
    main()
