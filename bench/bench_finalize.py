"""Throughput of `prep finalize` per array task, and the wall time it projects for 350BT with N tasks.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken .venv/bin/python bench/bench_finalize.py --tokens 2e9 --tasks 0 1 2

A synthetic dataset directory stands in for a tokenized corpus: DS/.work/ with recipe.json, plan.json and
--units committed units whose token files are sparse (a real header, then a hole made by truncate: zeros that
take no disk and read without I/O), with real index files (one entry per document of --doc-tokens tokens, random
holdout hashes) and done markers. For each value of --tasks the directory is built afresh, the shard layout is
built once in this process (timed: the step that reads every index), and then N processes
`python -m prep finalize --out DS --task-index I --task-count N` start at once (N = 0: one plain
`python -m prep finalize --out DS`, which also builds the layout itself). Each task prints its own tokens/s; the
last step (validation shards, shards moved into place, manifest, .work/ removed) is timed from the last task's
shard line to its exit. `prep verify` is timed once on the result. The shards written are real (2 bytes a token).

The layout build and the last step do not grow with the tokens copied but with documents, units and shards, so
they are measured once more on a directory with 350BT's counts of all of those (3,500 train shards, --meta-units
units, 350M documents, 10k of them validation) but small shards and documents, with as many tasks as there are
cores. The projection for 350BT with N tasks adds those two to 350e9 / (N x the per-task rate).

--prep-repo runs the `python -m prep` of another checkout (say, one before finalize had task flags; only --tasks
0 applies there).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prep.recipe import VAL_RULE  # noqa: E402
from prep.shard import HEADER_BYTES, make_header  # noqa: E402
from prep.workdir import INDEX_DTYPE, unit_paths, work_dir  # noqa: E402

TARGET_TOKENS = 350e9
TASK_LINE = re.compile(r"finalize(?: task \d+/\d+)?: (\d+) train shard\(s\) written.*?([\d,]+) tokens in ([\d.]+)s")


def zeros_sha256(n_bytes: int) -> str:
    digest, block = hashlib.sha256(), bytes(1 << 24)
    while n_bytes:
        take = min(n_bytes, len(block))
        digest.update(block[:take])
        n_bytes -= take
    return digest.hexdigest()


def build_work(out: Path, units: int, unit_tokens: int, doc_tokens: int, shard_tokens: int, val_tokens: int) -> None:
    """DS/.work/ as `prep tokenize --task-index 0 --task-count 1` leaves it, with sparse unit token files."""
    shutil.rmtree(out, ignore_errors=True)
    (work_dir(out) / "units").mkdir(parents=True)
    rcp = {"format_version": 1, "inputs": [], "text_column": "text", "skip_bad_docs": False,
           "tokenizer": {"name": "gpt2", "n_vocab": 50257, "eot": 50256, "eot_placement": "prepend"},
           "shard_tokens": shard_tokens, "validation": {"tokens": val_tokens, "seed": 0, "rule": VAL_RULE},
           "unit_bytes": 0}
    plan = {"units": [{"index": i, "path": f"/synthetic/{i:06d}.jsonl", "kind": "jsonl", "row_groups": []}
                      for i in range(units)], "skipped_inputs": []}
    (work_dir(out) / "recipe.json").write_text(json.dumps(rcp))
    (work_dir(out) / "plan.json").write_text(json.dumps(plan))
    sha = zeros_sha256(2 * unit_tokens)
    docs = unit_tokens // doc_tokens
    lengths = np.full(docs, doc_tokens, dtype=np.int64)
    lengths[-1] += unit_tokens - lengths.sum()
    rng = np.random.default_rng(0)
    for u in plan["units"]:
        paths = unit_paths(out, u["index"])
        with open(paths["tokens"], "wb") as f:
            f.write(make_header(unit_tokens))
            f.truncate(HEADER_BYTES + 2 * unit_tokens)
        index = np.empty(docs, dtype=INDEX_DTYPE)
        index["hash"] = rng.integers(0, 2**64, size=docs, dtype=np.uint64)
        index["tokens"] = lengths
        np.save(paths["index"], index)
        paths["done"].write_text(json.dumps({
            "unit": u, "tokens": unit_tokens, "documents": docs, "tokens_sha256": sha,
            "stats": {"documents": docs, "empty_skipped": 0, "bad_skipped": 0, "invalid_utf8_replaced": 0},
            "bad_examples": []}))


def run_tasks(out: Path, n: int, prep_repo: Path) -> dict:
    """Start the N tasks at once; per task: its tokens/s; overall: wall time and the last step's time."""
    env = dict(os.environ, PYTHONPATH=str(prep_repo))
    commands = ([[sys.executable, "-m", "prep", "finalize", "--out", str(out)]] if n == 0 else
                [[sys.executable, "-m", "prep", "finalize", "--out", str(out), "--task-index", str(i),
                  "--task-count", str(n)] for i in range(n)])
    start = time.monotonic()
    procs = [subprocess.Popen(c, cwd=prep_repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    results = [{} for _ in procs]

    def read(proc, result):
        for line in proc.stderr:
            m = TASK_LINE.search(line)
            if m:
                result.update(shards=int(m.group(1)), tokens=int(m.group(2).replace(",", "")),
                              seconds=float(m.group(3)), shards_done_at=time.monotonic())
            if line.startswith("finalized "):
                result["finalized_at"] = time.monotonic()
            result.setdefault("log", []).append(line)
        proc.wait()
        result["ended_at"] = time.monotonic()

    threads = [threading.Thread(target=read, args=(p, r)) for p, r in zip(procs, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p, r in zip(procs, results):
        if p.returncode:
            sys.exit(f"finalize failed ({p.args}):\n{''.join(r.get('log', []))[-3000:]}")
    last = next((r for r in results if "finalized_at" in r), None)
    if last is None:  # an old checkout prints no per-task line: its one process is the last step too
        last = results[0]
    wall = max(r["ended_at"] for r in results) - start
    rates = [r["tokens"] / r["seconds"] for r in results if r.get("tokens")]
    return {"wall": wall, "rates": rates, "tokens": sum(r.get("tokens", 0) for r in results),
            "last_step": (last["ended_at"] - last["shards_done_at"]) if "shards_done_at" in last else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=2e9, help="tokens in the synthetic dataset (default 2e9)")
    p.add_argument("--units", type=int, default=40, help="committed units (default 40)")
    p.add_argument("--doc-tokens", type=int, default=1000, help="tokens per document (FineWeb-Edu averages ~1000)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--val-tokens", type=int, default=10_000_000)
    p.add_argument("--tasks", type=int, nargs="+", default=[0, 1, 2],
                   help="array sizes to run, one after another (0: one plain `prep finalize`)")
    p.add_argument("--project", type=int, nargs="+", default=[1, 8, 32, 64, 128],
                   help="array sizes to project 350BT for")
    p.add_argument("--meta-shard-tokens", type=int, default=1_000_000,
                   help="shard size of the run at 350BT's counts (default 1M tokens)")
    p.add_argument("--meta-units", type=int, default=4000,
                   help="units of that run (default 4000: 350BT of text in units of at most 256 MiB is ~6000)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/bench_finalize"))
    p.add_argument("--prep-repo", type=Path, default=REPO, help="the checkout whose `python -m prep` runs")
    args = p.parse_args()
    unit_tokens = int(args.tokens) // args.units
    total = unit_tokens * args.units
    out = args.dir / "ds"
    print(f"synthetic dataset: {total:,} tokens in {args.units} sparse units of {unit_tokens:,}, documents of "
          f"{args.doc_tokens:,} tokens; shards of {args.shard_tokens:,}, validation {args.val_tokens:,}; "
          f"cpus {os.cpu_count()}; prep from {args.prep_repo}; 1-min load {os.getloadavg()[0]:.1f}")
    print("| tasks | tokens/s per task | aggregate tokens/s | layout build (s) | last step (s) | wall (s) |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for n in args.tasks:
        build_work(out, args.units, unit_tokens, args.doc_tokens, args.shard_tokens, args.val_tokens)
        layout_s = None
        if n > 0:  # timed apart from the tasks (which then only load it); a plain finalize builds it itself
            from prep.finalize import open_work
            t0 = time.monotonic()
            open_work(out)
            layout_s = time.monotonic() - t0
        r = run_tasks(out, n, args.prep_repo)
        rows[n] = dict(r, layout=layout_s)
        per_task = ", ".join(f"{x / 1e6:,.1f}M" for x in r["rates"]) or "-"
        layout_cell = "-" if layout_s is None else f"{layout_s:.2f}"
        last_cell = "-" if r["last_step"] is None else f"{r['last_step']:.2f}"
        print(f"| {n or '1 (plain)'} | {per_task} | {total / r['wall'] / 1e6:,.1f}M | {layout_cell} | {last_cell} | "
              f"{r['wall']:.1f} |", flush=True)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "prep", "verify", str(out)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    verify_s = time.monotonic() - t0
    shutil.rmtree(out, ignore_errors=True)
    print(f"prep verify (one process): {verify_s:.1f}s, {total / verify_s / 1e6:,.1f}M tokens/s")
    tasked = [n for n in rows if n > 0 and rows[n]["rates"]]
    if not tasked:
        return
    # The per-task rate with the most tasks that still had a core each: what a task gets on its own node.
    fit = max((n for n in tasked if n <= (os.cpu_count() or 1)), default=min(tasked))
    rate = statistics.median(rows[fit]["rates"])
    # The layout build and the last step grow with documents, units and shards rather than with the tokens copied:
    # measure them on a dataset with 350BT's numbers of shards, units, documents and validation documents, only
    # with small shards and documents (its index files are real: 16 bytes a document, 5.6 GB).
    meta_shards = int(TARGET_TOKENS // args.shard_tokens)
    meta_total = meta_shards * args.meta_shard_tokens
    docs_350 = int(TARGET_TOKENS // args.doc_tokens)
    meta_doc_tokens = max(1, meta_total // docs_350)
    meta_val = args.val_tokens // args.doc_tokens * meta_doc_tokens
    build_work(out, args.meta_units, meta_total // args.meta_units, meta_doc_tokens, args.meta_shard_tokens,
               meta_val)
    from prep.finalize import open_work
    t0 = time.monotonic()
    open_work(out)
    layout_350 = time.monotonic() - t0
    meta = run_tasks(out, fit, args.prep_repo)
    shutil.rmtree(out, ignore_errors=True)
    last_350 = meta["last_step"]
    print(f"at 350BT's counts: {meta_shards:,} train shards (of {args.meta_shard_tokens:,} tokens), "
          f"{args.meta_units:,} units, {meta_total // meta_doc_tokens:,} documents ({meta_doc_tokens} tokens each), "
          f"{meta_val // meta_doc_tokens:,} of them validation; {fit} task(s): layout build {layout_350:.1f}s "
          f"(page cache warm), last step {last_350:.1f}s, wall {meta['wall']:.1f}s")
    print(f"projection for 350BT ({meta_shards:,} shards of {args.shard_tokens:,}) at {rate / 1e6:,.1f}M tokens/s "
          f"per task (the median with {fit} task(s)), plus the layout build and the last step measured at 350BT's "
          f"counts above; each task on its own core, on a filesystem that sustains 4 bytes a token per task (2 read, "
          f"2 written):")
    print("| tasks | shard copy (s) | projected wall (min) |")
    print("|---|---|---|")
    for n in args.project:
        copy = TARGET_TOKENS / (n * rate)
        print(f"| {n} | {copy:,.0f} | {(layout_350 + copy + last_350) / 60:,.1f} |")
    print(f"(prep verify, one process, at this run's rate: {TARGET_TOKENS / (total / verify_s) / 60:,.0f} min for "
          f"350BT)")


if __name__ == "__main__":
    main()
