"""A validation split smaller than one validation batch: no matter when the run never evaluates; else one line."""
import re
import subprocess

import pytest

from tests.conftest import PYTHON, REPO
from tests.fixtures_data import write_jsonl
from tests.fixtures_run import run_train, train_command

# 16 windows of 17 tokens per validation batch; the split below holds about 10.
BIG_BATCH = ["batch.micro_batch=16", "batch.seq_len=16", "batch.total_tokens=256", "schedule.max_steps=1",
             "optim.warmup_steps=1", "checkpoint.every=0", "sample.every=0", "log.tensorboard=false"]


def small_val(root, shakespeare_docs, val_tokens: int):
    src = write_jsonl(root / "docs.jsonl", [{"text": d} for d in shakespeare_docs[:2000]])
    subprocess.run([PYTHON, "-m", "prep", "tokenize", "--input", str(src), "--out", str(root / "ds"),
                    "--shard-tokens", "100000", "--val-tokens", str(val_tokens)], check=True, cwd=REPO,
                   capture_output=True)
    return root / "ds"


@pytest.fixture(scope="module")
def small_val_dataset(tmp_path_factory, shakespeare_docs):
    return small_val(tmp_path_factory.mktemp("small_val"), shakespeare_docs, 150)


@pytest.mark.parametrize("val_tokens", [150, 0])
def test_no_validation_batch_needed_when_eval_every_is_0(val_tokens, tmp_path, shakespeare_docs):
    """A split smaller than one batch, or none at all (prep --val-tokens 0): nothing is read from it."""
    dataset = small_val(tmp_path, shakespeare_docs, val_tokens)
    run = tmp_path / "run"
    run_train(train_command(run, dataset, *BIG_BATCH, "eval.every=0"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step1"


def test_too_small_validation_split_names_dataset_tokens_and_batch(small_val_dataset, tmp_path):
    run = tmp_path / "run"
    result = run_train(train_command(run, small_val_dataset, *BIG_BATCH, "eval.every=1"), check_rc=1)
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.stderr[-2000:]
    assert str(small_val_dataset) in error[0]
    assert re.search(r"the val split holds [\d,]+ tokens, \d+ windows of 17, fewer than one validation batch of 16 "
                     r"windows \(micro_batch 16 x world_size 1\)", error[0]), error[0]
    assert "eval.every=0" in error[0]
    assert not (run / "checkpoints").exists()
