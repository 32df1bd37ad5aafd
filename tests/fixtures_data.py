"""Datasets made by the real `prep` stage from ../shared text, for train/eval/slurm tests."""
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, SHARED

__all__ = ["shakespeare_docs", "tiny_dataset"]


def split_documents(text: str) -> list[str]:
    """Tiny Shakespeare as documents: one per speech (blocks separated by blank lines)."""
    return [block.strip() for block in text.split("\n\n") if block.strip()]


@pytest.fixture(scope="session")
def shakespeare_docs() -> list[str]:
    return split_documents((SHARED / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, shakespeare_docs) -> Path:
    """A finished dataset dir: all of Tiny Shakespeare (~338k tokens), small shards, a val split."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    src = root / "docs.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for i, doc in enumerate(shakespeare_docs):
            f.write(json.dumps({"id": f"shakespeare-{i}", "text": doc}) + "\n")
    out = root / "ds"
    subprocess.run([PYTHON, "-m", "prep", "tokenize", "--input", str(src), "--out", str(out),
                    "--shard-tokens", "100000", "--val-tokens", "20000"],
                   check=True, cwd=REPO)
    return out
