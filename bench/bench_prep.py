"""Tokenization throughput of `prep tokenize`, side by side with its ceiling and with the anchors' approach.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken .venv/bin/python bench/bench_prep.py --workers 2 --mb 80

Measurements on the same FineWeb-schema parquet file, interleaved in one invocation:
  ceiling    tiktoken's single-process encode_ordinary rate on the same documents, times W
  parallel   the same encode split over W forked processes at once (what W cores really give on a shared machine)
  prep       `python -m prep tokenize --workers W` from parquet to finished shards + manifest
  reference  the anchors' approach (build-nanogpt's fineweb.py style, written here): the main process reads the
             documents, multiprocessing Pool(W).imap(chunksize=16) tokenizes one document per task into a uint16
             array, the main process fills a shard buffer and np.save()s each full shard
prep and reference each run in a fresh subprocess (timed after imports) so each one's peak RSS is its own; prep
runs once per --shard-tokens value to show that worker memory does not grow with the shard size.
The bench data is Tiny Shakespeare repeated and reshuffled: runs of 20 consecutive speeches joined into one
document (~900 tokens, the size of an average FineWeb document), shuffled, repeated until --mb MB of text,
written in row groups of 1000 documents.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PIPELINE_SHARED", REPO.parent / "shared"))


def make_parquet(path: Path, mb: int, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    if path.exists():
        return path
    text = (SHARED / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    speeches = [b.strip() for b in text.split("\n\n") if b.strip()]
    rng = random.Random(seed)
    docs, size = [], 0
    while size < mb * 1_000_000:
        start = rng.randrange(len(speeches) - 20)
        docs.append("\n\n".join(speeches[start:start + 20]))
        size += len(docs[-1].encode())
    n = len(docs)
    table = pa.table({"text": docs, "id": [f"<urn:uuid:bench-{i:09d}>" for i in range(n)],
                      "dump": ["bench"] * n, "url": [f"https://example.org/{i}" for i in range(n)],
                      "language": ["en"] * n, "token_count": [0] * n})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=1000)  # ~3.5 MB row groups: 2 workers get ~25 units to share
    os.replace(tmp, path)
    return path


def read_texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def measure_ceiling(path: Path, workers: int = 1) -> dict:
    """encode_ordinary over every document: in this process (workers=1), or split over `workers` forked processes."""
    import multiprocessing as mp

    from common import tokenizer
    tokenizer.get_encoding()
    texts = read_texts(path)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    if workers == 1:
        n = _count_tokens(texts)
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            n = sum(pool.map(_count_tokens, [texts[i::workers] for i in range(workers)]))
    return {"tokens": n, "seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu_start}


def _count_tokens(texts: list[str]) -> int:
    from common import tokenizer
    enc = tokenizer.get_encoding()
    return sum(len(enc.encode_ordinary(t)) + 1 for t in texts)


# ---- the reference: the anchors' approach, one document per pool task ----

def _ref_init():
    global _enc
    from common import tokenizer
    _enc = tokenizer.get_encoding()


def _ref_tokenize(text: str) -> np.ndarray:
    tokens = [50256] + _enc.encode_ordinary(text)
    arr = np.array(tokens)
    assert (0 <= arr).all() and (arr < 2**16).all()
    return arr.astype(np.uint16)


def run_reference(path: Path, out: Path, workers: int, shard_tokens: int) -> dict:
    import multiprocessing as mp
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    texts = read_texts(path)
    buf = np.empty(shard_tokens, dtype=np.uint16)
    filled, shard, total = 0, 0, 0
    with mp.get_context("fork").Pool(workers, initializer=_ref_init) as pool:
        for tokens in pool.imap(_ref_tokenize, texts, chunksize=16):
            total += len(tokens)
            while len(tokens):
                take = min(shard_tokens - filled, len(tokens))
                buf[filled:filled + take] = tokens[:take]
                filled += take
                tokens = tokens[take:]
                if filled == shard_tokens:
                    np.save(out / f"shard_{shard:06d}", buf)
                    shard, filled = shard + 1, 0
        if filled:
            np.save(out / f"shard_{shard:06d}", buf[:filled])
    return {"tokens": total, "seconds": time.perf_counter() - start}


def run_prep(path: Path, out: Path, workers: int, shard_tokens: int) -> dict:
    from prep.__main__ import main as prep_main
    from prep.reader import Dataset
    start = time.perf_counter()
    rc = prep_main(["tokenize", "--input", str(path), "--out", str(out), "--workers", str(workers),
                    "--shard-tokens", str(shard_tokens), "--val-tokens", "100000"])
    seconds = time.perf_counter() - start
    assert rc == 0
    return {"tokens": sum(s.tokens for s in Dataset(out).shards), "seconds": seconds}


def child(args) -> None:
    """One measured run in this fresh process; prints a JSON line with timings and peak RSS (MiB)."""
    import common.tokenizer  # noqa: F401  imports are outside the timing
    import prep.tokenize  # noqa: F401
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu_before = cpu_seconds()
    if args.child == "ceiling":
        result = measure_ceiling(args.data, args.workers)
    else:
        fn = {"prep": run_prep, "reference": run_reference}[args.child]
        result = fn(args.data, args.out, args.workers, args.shard_tokens)
    result.setdefault("cpu_seconds", cpu_seconds() - cpu_before)  # the ceiling times its encode loop alone
    result["rss_main_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_worker_max_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["rss_after_imports_mib"] = baseline
    print(json.dumps(result))


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (pool workers are joined before it is read)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def spawn(kind: str, data: Path, out: Path, workers: int, shard_tokens: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run([sys.executable, __file__, "--child", kind, "--data", str(data), "--out", str(out),
                        "--workers", str(workers), "--shard-tokens", str(shard_tokens)],
                       cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{kind} failed:\n{r.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mb", type=int, default=80, help="MB of text in the bench parquet")
    p.add_argument("--dir", type=Path, default=Path("/tmp/bench_prep"))
    p.add_argument("--shard-tokens", type=int, nargs="+", default=[10_000_000, 100_000_000])
    p.add_argument("--repeat", type=int, default=2, help="interleaved rounds; each row reports its best round")
    p.add_argument("--child", choices=["prep", "reference", "ceiling"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.shard_tokens = args.shard_tokens[0]
        return child(args)
    args.dir.mkdir(parents=True, exist_ok=True)
    data = make_parquet(args.dir / f"bench_{args.mb}mb.parquet", args.mb)
    w = args.workers
    best: dict[str, dict] = {}

    def keep(name, result):
        if name not in best or result["seconds"] < best[name]["seconds"]:
            best[name] = result

    load = [os.getloadavg()[0]]
    for _ in range(args.repeat):  # interleaved, so a burst of load on the shared machine hits every row alike
        keep("ceiling", spawn("ceiling", data, args.dir / "none", 1, 0))
        keep("parallel", spawn("ceiling", data, args.dir / "none", w, 0))
        keep("reference", spawn("reference", data, args.dir / "ref", w, args.shard_tokens[0]))
        for st in args.shard_tokens:
            keep(f"prep{st}", spawn("prep", data, args.dir / "ds", w, st))
        load.append(os.getloadavg()[0])
    rate = {k: r["tokens"] / r["seconds"] for k, r in best.items()}
    ceiling = rate["ceiling"] * w
    print(f"data: {data} ({data.stat().st_size / 1e6:.0f} MB parquet, {best['ceiling']['tokens']:,} tokens); "
          f"workers {w}; cpus {os.cpu_count()}; best of {args.repeat} interleaved rounds; "
          f"1-min load average during the rounds: {', '.join(f'{x:.1f}' for x in load)}")
    # Tokens per CPU-second do not depend on how much of the shared machine a run got: they say how much of the
    # CPU a pipeline spends on anything but encoding, which is what wall-clock rate on W idle cores comes down to.
    cpu_rate = {k: r["tokens"] / r["cpu_seconds"] for k, r in best.items()}
    print("| run | shard tokens | tokens/s (wall) | vs ceiling | vs parallel ceiling | vs reference | "
          "tokens per CPU-s | CPU efficiency vs tiktoken | CPU efficiency vs reference | peak RSS main / worker (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def row(label, key, st="-", main_rss="-", worker_rss="-"):
        r = rate[key] if key else ceiling
        c = cpu_rate[key or "ceiling"]
        print(f"| {label} | {st} | {r:,.0f} | {r / ceiling:.2f} | {r / rate['parallel']:.2f} | "
              f"{r / rate['reference']:.2f} | {c:,.0f} | {c / cpu_rate['ceiling']:.2f} | "
              f"{c / cpu_rate['reference']:.2f} | {main_rss} / {worker_rss} |")

    row(f"ceiling: tiktoken 1 process x {w}", None)
    row(f"parallel ceiling: tiktoken in {w} processes at once", "parallel")
    ref = best["reference"]
    row("reference: Pool.imap per document, np.save", "reference", f"{args.shard_tokens[0]:,}",
        f"{ref['rss_main_mib']:.0f}", f"{ref['rss_worker_max_mib']:.0f}")
    for st in args.shard_tokens:
        r = best[f"prep{st}"]
        row(f"prep tokenize --workers {w}", f"prep{st}", f"{st:,}", f"{r['rss_main_mib']:.0f}",
            f"{r['rss_worker_max_mib']:.0f}")
    print(f"(peak RSS right after imports, before any work: {best[f'prep{args.shard_tokens[0]}']['rss_after_imports_mib']:.0f}"
          f" MiB: Python, numpy, pyarrow and tiktoken's BPE; forked workers share those pages)")


if __name__ == "__main__":
    main()
