"""Datasets made by the real `prep` stage from ../shared text, for train/eval/slurm tests; input-file writers."""
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, SHARED

__all__ = ["shakespeare_docs", "tiny_dataset", "fineweb_parquet", "parquet_reference"]

# The recipe of parquet_reference: 15 units (one per row group), several shards, a validation split.
REFERENCE_RECIPE = ["--shard-tokens", "60000", "--val-tokens", "15000", "--unit-bytes", "1"]


def split_documents(text: str) -> list[str]:
    """Tiny Shakespeare as documents: one per speech (blocks separated by blank lines)."""
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def write_fineweb_parquet(path: Path, docs: list[str], row_group_size: int, ids: list[str] | None = None) -> Path:
    """A parquet file in FineWeb's schema (text, id, dump, url, date, file_path, language, ...), several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    n = len(docs)
    ids = ids or [f"<urn:uuid:{i:08d}-0000-4000-8000-{i:012d}>" for i in range(n)]
    table = pa.table({
        "text": pa.array(docs, pa.string()),
        "id": pa.array(ids, pa.string()),
        "dump": pa.array(["CC-MAIN-2024-10"] * n),
        "url": pa.array([f"https://example.org/play/{i}" for i in range(n)]),
        "date": pa.array(["2024-02-21T00:00:00Z"] * n),
        "file_path": pa.array(["s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/0/warc/0.warc.gz"] * n),
        "language": pa.array(["en"] * n),
        "language_score": pa.array([0.9] * n, pa.float64()),
        "token_count": pa.array([len(d) // 4 for d in docs], pa.int64()),
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Plain .jsonl, or zstandard-compressed when the name ends in .zst."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if path.name.endswith(".zst"):
        import zstandard
        data = zstandard.ZstdCompressor(level=3).compress(data)
    path.write_bytes(data)
    return path


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def shakespeare_docs() -> list[str]:
    return split_documents((SHARED / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, shakespeare_docs) -> Path:
    """A finished dataset dir: all of Tiny Shakespeare (~338k tokens), small shards, a val split."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    src = write_jsonl(root / "docs.jsonl", [{"id": f"shakespeare-{i}", "text": d} for i, d in enumerate(shakespeare_docs)])
    out = root / "ds"
    subprocess.run([PYTHON, "-m", "prep", "tokenize", "--input", str(src), "--out", str(out),
                    "--shard-tokens", "100000", "--val-tokens", "20000"],
                   check=True, cwd=REPO)
    return out


@pytest.fixture(scope="session")
def fineweb_parquet(tmp_path_factory, shakespeare_docs):
    """All of Tiny Shakespeare as a FineWeb-schema parquet file of 15 row groups."""
    return write_fineweb_parquet(tmp_path_factory.mktemp("raw") / "000_00000.parquet", shakespeare_docs, 500)


@pytest.fixture(scope="session")
def parquet_reference(tmp_path_factory, fineweb_parquet):
    """The dataset of one uninterrupted, single-process run; every other run must equal it byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "ds"
    from prep.__main__ import main as prep_main
    assert prep_main(["tokenize", "--input", str(fineweb_parquet), "--out", str(out), *REFERENCE_RECIPE]) == 0
    return tree_bytes(out)
