"""The training loader at scale: keyed epoch order, background reads, exact resume, bad token ids, data wait."""
import json
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from prep.reader import Dataset
from prep.shard import HEADER_BYTES, ShardError
from tests.conftest import PYTHON, REPO
from tests.fixtures_run import read_metrics, run_train, train_command
from train.data import FeistelOrder, TokenIdError, TrainLoader, WindowIndex


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return Dataset(tiny_dataset)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4099])
def test_feistel_order_is_a_permutation_of_any_size(n):
    order = FeistelOrder(n, seed=3, epoch=0)
    assert sorted(order(np.arange(n)).tolist()) == list(range(n))


def test_feistel_order_is_keyed_by_seed_and_epoch_and_looks_shuffled():
    n = 50_000
    a, b, c = (FeistelOrder(n, s, e)(np.arange(n)) for s, e in ((3, 0), (3, 1), (4, 0)))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a, FeistelOrder(n, 3, 0)(np.arange(n)))  # a pure function of (n, seed, epoch)
    # No trace of the source order: rising steps about half the time, no correlation with position, and
    # consecutive positions scattered over the whole range (not within a block).
    assert 0.48 < np.mean(np.diff(a) > 0) < 0.52
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.02
    assert np.median(np.abs(np.diff(a))) > n / 5
    # Positions are evaluated independently: any subset in any order gives the same windows.
    picks = np.array([49_999, 7, 12_345, 0])
    assert np.array_equal(FeistelOrder(n, 3, 0)(picks), a[picks])


def batches(loader, n):
    return [tuple(t.clone() for t in loader.next()) for _ in range(n)]


def same(xs, ys):
    return len(xs) == len(ys) and all(bool((a[0] == b[0]).all() and (a[1] == b[1]).all()) for a, b in zip(xs, ys))


def test_prefetching_changes_no_batch_across_an_epoch_boundary(dataset):
    B, T = 64, 32
    per_epoch = WindowIndex(dataset, "train", T).total // (2 * B)
    n = per_epoch + 5
    sync = TrainLoader(dataset, B, T, 1, 2, seed=9, prefetch=0)
    ahead = TrainLoader(dataset, B, T, 1, 2, seed=9, prefetch=8)
    try:
        expected, got = batches(sync, n), batches(ahead, n)
    finally:
        ahead.close()
    assert same(expected, got)
    assert sync.epoch == ahead.epoch == 1 and ahead.state_dict() == sync.state_dict()


def test_state_with_batches_in_flight_resumes_at_the_first_unseen_batch(dataset):
    B, T = 64, 32
    reference = TrainLoader(dataset, B, T, 0, 2, seed=9, prefetch=0)
    expected = batches(reference, 90)  # past the epoch's end (~77 steps)
    a = TrainLoader(dataset, B, T, 0, 2, seed=9)
    for cut in (3, 76, 80):
        a.load_state_dict({"epoch": 0, "position": 0, "seed": 9, "windows": a.index.total, "order": "feistel"})
        assert same(batches(a, cut), expected[:cut])  # eight more are read ahead by now
        state = json.loads(json.dumps(a.state_dict()))
        b = TrainLoader(dataset, B, T, 0, 2, seed=9)
        b.load_state_dict(state)
        assert same(batches(b, 90 - cut), expected[cut:]), cut
        b.close()
    a.close()


def test_close_stops_the_reader_threads_and_an_unclosed_loader_does_not_hold_exit(dataset, tiny_dataset):
    before = set(threading.enumerate())  # other tests' loaders are none of this test's business

    def readers():
        return [t for t in threading.enumerate() if t not in before and t.name.startswith("train-loader")]
    loader = TrainLoader(dataset, 4, 32, 0, 1, seed=1)
    loader.next()
    assert readers()
    loader.close()
    deadline = time.time() + 10
    while readers() and time.time() < deadline:
        time.sleep(0.05)
    assert not readers()
    script = ("import sys; from prep.reader import Dataset; from train.data import TrainLoader; "
              f"l = TrainLoader(Dataset({str(tiny_dataset)!r}), 4, 32, 0, 1, seed=1); l.next(); sys.exit(3)")
    started = time.time()
    result = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert time.time() - started < 30


def patch_token(dataset_dir, seq_len, window, offset, value):
    """Overwrite one token of `window` (its offset-th) in the shard file itself; returns (shard path, position)."""
    index = WindowIndex(Dataset(dataset_dir), "train", seq_len)
    shard = int(np.searchsorted(index.offsets, window, side="right") - 1)
    position = (window - int(index.offsets[shard])) * seq_len + offset
    path = index.files[shard].path
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 2 * position)
        f.write(np.array([value], dtype="<u2").tobytes())
    return path, position


def patched_copy(tiny_dataset, tmp_path, seed: int, micro_step: int, row: int, offset: int):
    """A copy of tiny_dataset whose window `row` of micro step `micro_step` (batch 2 x 32, this seed) holds id
    50300 at `offset`; returns (dataset dir, shard path, token position)."""
    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir)
    order = TrainLoader(Dataset(ds_dir), 2, 32, 0, 1, seed=seed, prefetch=0)
    windows = [order.next_windows() for _ in range(micro_step + 1)][micro_step]
    return (ds_dir, *patch_token(ds_dir, 32, int(windows[row]), offset, 50300))


def test_a_token_id_above_the_vocabulary_is_refused_at_its_batch_naming_shard_and_position(tmp_path, tiny_dataset):
    ds_dir, path, position = patched_copy(tiny_dataset, tmp_path, seed=5, micro_step=3, row=1, offset=17)
    loader = TrainLoader(Dataset(ds_dir), 2, 32, 0, 1, seed=5)
    for _ in range(3):
        loader.next()  # read ahead of the bad one, without complaint
    with pytest.raises(TokenIdError) as err:
        loader.next()
    loader.close()
    message = str(err.value)
    assert message.startswith(f"{path}: token {position:,} (byte {HEADER_BYTES + 2 * position:,}) is id 50300")
    assert "n_vocab 50257" in message and "\n" not in message
    assert loader.state_dict()["position"] == 3 * 2  # the bad batch was never handed out


def test_train_stops_before_the_bad_batch_reaches_the_model(tmp_path, tiny_dataset):
    # FAST: micro batch 2 x 32, 2 micro steps per update; the patched window is in update 2's first micro step.
    ds_dir, path, position = patched_copy(tiny_dataset, tmp_path, seed=1337, micro_step=2, row=0, offset=0)
    run_dir = tmp_path / "run"
    result = run_train(train_command(run_dir, ds_dir, "seed=1337", "eval.every=0", "sample.every=0"), check_rc=None)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "IndexError" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}: token {position:,} ") and "is id 50300" in last, last
    assert [r["step"] for r in read_metrics(run_dir)[0]] == [1]  # update 1 trained; update 2 never ran
    assert not (run_dir / "checkpoints").exists()
    assert "data_wait=" in result.stderr  # the progress bar shows the wait of update 1


def test_every_update_logs_its_data_wait_to_metrics_and_tensorboard(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train = read_metrics(tiny_run)[0]
    assert all(0 <= r["data_wait_ms"] < 1e3 * r["step_time_s"] for r in train), train
    events = EventAccumulator(str(tiny_run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/data_wait_ms")] == [r["step"] for r in train]


def test_a_low_open_file_limit_is_raised_or_refused_in_one_line(tiny_dataset):
    n = len(Dataset(tiny_dataset).split("train"))
    script = ("import resource, sys; from prep.reader import Dataset, DatasetError; "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
              "ds = Dataset(sys.argv[3])\n"
              "try:\n    ds.files('train')\nexcept DatasetError as e:\n    print('refused:', e); sys.exit(1)\n"
              "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    raised = subprocess.run([PYTHON, "-c", script, "64", "4096", str(tiny_dataset)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert raised.returncode == 0 and int(raised.stdout) == n + 512, raised.stdout + raised.stderr
    refused = subprocess.run([PYTHON, "-c", script, "64", "128", str(tiny_dataset)], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and f"{n} shards need {n + 512} open files" in refused.stdout, refused.stdout


def test_a_shard_truncated_while_open_is_named_not_read_as_garbage(tmp_path, tiny_dataset):
    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds_dir)
    index = WindowIndex(Dataset(ds_dir), "train", 32)
    shard = index.files[0]
    with open(shard.path, "r+b") as f:
        f.truncate(HEADER_BYTES + 2 * 1000)
    with pytest.raises(ShardError) as err:
        index.read(np.array([100]))  # tokens 3,200..3,232: past the new end
    assert str(err.value) == (f"{shard.path}: ends before token 3,233 although its header promised "
                              f"{shard.tokens:,} tokens (truncated while open?)")
