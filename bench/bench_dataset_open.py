"""What train pays at start to check a dataset against its manifest (prep.reader.Dataset + check_files).

    .venv/bin/python bench/bench_dataset_open.py [--tokens 350e9] [--repeat 3] [--work DIR]

Builds bench_scale.py's sparse dataset of 100M-token shards (valid headers, holes for the tokens: 350B tokens take
no disk) and times, in this process: parsing and checking the manifest (Dataset(path)), and checking every shard's
size and the sha256 of its first and last 4 KiB (check_files), with a cold page cache (needs root; else "warm")
and a warm one. The directory is removed at the end.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_scale import drop_page_cache, sparse_dataset  # noqa: E402
from prep.reader import Dataset  # noqa: E402


def timed_open(path: Path) -> tuple[float, float]:
    start = time.perf_counter()
    ds = Dataset(path)
    parsed = time.perf_counter()
    ds.check_files()
    return parsed - start, time.perf_counter() - parsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=float, default=350e9)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--work", type=Path, default=None, help="where to build the dataset (default: a temporary dir)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.work))
    try:
        ds = sparse_dataset(work / "ds", int(args.tokens))
        n = len(Dataset(ds).shards)
        print(f"{n} shards ({args.tokens:.3g} train tokens, sparse)")
        for label in ("cold", "warm"):
            for _ in range(args.repeat):
                cold = drop_page_cache() if label == "cold" else False
                parse_s, check_s = timed_open(ds)
                print(f"{label if label == 'warm' or cold else 'warm (no root: cache not dropped)'}: manifest "
                      f"{parse_s * 1e3:,.0f} ms, shard sizes + fingerprints {check_s * 1e3:,.0f} ms "
                      f"({check_s / n * 1e6:,.0f} us/shard)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
