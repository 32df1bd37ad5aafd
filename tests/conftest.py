"""Shared test setup: the read-only inputs in ../shared, offline mode, and stage fixtures."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PIPELINE_SHARED", REPO.parent / "shared")).resolve()
PYTHON = sys.executable


def pytest_configure(config):
    missing = [p for p in ("tiktoken", "data/tinyshakespeare.txt", "data/hellaswag_val.jsonl")
               if not (SHARED / p).exists()]
    if missing:
        raise pytest.UsageError(
            f"test inputs missing under {SHARED}: {', '.join(missing)} "
            "(check out ../shared beside the project, or set PIPELINE_SHARED)")
    # Tests never touch the network: tokenizer from the shared cache, Hub libraries offline.
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# Fixtures that build real artefacts with the stages themselves, shared across test modules.
from tests.fixtures_data import *  # noqa: E402,F401,F403
from tests.fixtures_run import *  # noqa: E402,F401,F403
