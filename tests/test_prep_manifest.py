"""The dataset directory against its manifest: what prep.reader.Dataset refuses at open and before train reads."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from prep.__main__ import main as prep_main
from prep.reader import Dataset, DatasetError
from tests.conftest import PYTHON, REPO
from tests.fixtures_run import run_train, train_command


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory, tiny_dataset) -> Path:
    """The same documents and shard size as tiny_dataset, another validation seed: same-size, other shards."""
    out = tmp_path_factory.mktemp("other") / "ds"
    docs = json.loads((tiny_dataset / "manifest.json").read_text())["inputs"][0]["path"]
    assert prep_main(["tokenize", "--input", docs, "--out", str(out), "--shard-tokens", "100000",
                      "--val-tokens", "20000", "--val-seed", "1"]) == 0
    return out


def copy_of(ds: Path, tmp_path: Path) -> Path:
    shutil.copytree(ds, tmp_path / "ds")
    return tmp_path / "ds"


def edit_manifest(ds: Path, edit) -> Path:
    path = ds / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


def refusal(ds: Path) -> str:
    with pytest.raises(DatasetError) as err:
        Dataset(ds).files("train")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_finished_dataset_opens_and_records_each_shards_size_and_fingerprint(tiny_dataset):
    ds = Dataset(tiny_dataset)
    assert len(ds.files("train")) == 4 and len(ds.files("val")) == 1
    assert all(s.bytes == 1024 + 2 * s.tokens and len(s.edges_sha256) == 64 for s in ds.shards)


def test_a_shard_swapped_for_a_same_size_shard_of_another_dataset_is_refused(tiny_dataset, other_dataset, tmp_path):
    ds = copy_of(tiny_dataset, tmp_path)
    swapped = ds / "train_000001.bin"
    assert swapped.stat().st_size == (other_dataset / swapped.name).stat().st_size
    assert swapped.read_bytes() != (other_dataset / swapped.name).read_bytes()
    shutil.copyfile(other_dataset / swapped.name, swapped)
    message = refusal(ds)
    assert message.startswith(f"{swapped}: its first and last 4 KiB do not match {ds / 'manifest.json'}"), message


def test_train_refuses_the_swapped_shard_in_one_line_before_training(tiny_dataset, other_dataset, tmp_path):
    ds = copy_of(tiny_dataset, tmp_path)
    shutil.copyfile(other_dataset / "train_000000.bin", ds / "train_000000.bin")
    result = run_train(train_command(tmp_path / "run", ds, "eval.every=0"), check_rc=None)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {ds / 'train_000000.bin'}: its first and last 4 KiB do not match"), last
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_truncated_or_missing_shard_and_an_unlisted_one_are_named(tiny_dataset, tmp_path):
    ds = copy_of(tiny_dataset, tmp_path)
    with open(ds / "train_000002.bin", "r+b") as f:
        f.truncate(5000)
    assert refusal(ds).startswith(f"{ds / 'train_000002.bin'}: 5,000 bytes, {ds / 'manifest.json'} says ")
    (ds / "train_000002.bin").unlink()
    assert refusal(ds).startswith(f"{ds / 'manifest.json'}: lists train_000002.bin, which is missing from {ds}")
    shutil.copyfile(tiny_dataset / "train_000002.bin", ds / "train_000002.bin")
    shutil.copyfile(tiny_dataset / "train_000002.bin", ds / "train_000004.bin")
    assert refusal(ds).startswith(f"{ds / 'train_000004.bin'}: a shard that {ds / 'manifest.json'} does not list")


def drop_last_train_shard(manifest):
    manifest["shards"] = [s for s in manifest["shards"] if s["name"] != "train_000002.bin"]


def keep_totals(edit):
    """An edit that also rewrites the totals to add up, as a careful hand-editor would."""
    def both(manifest):
        edit(manifest)
        for split in ("train", "val"):
            shards = [s for s in manifest["shards"] if s["split"] == split]
            manifest["totals"][split] = {"tokens": sum(s["tokens"] for s in shards),
                                         "documents": sum(s["documents"] for s in shards), "shards": len(shards)}
    return both


@pytest.mark.parametrize("edit, needle", [
    (drop_last_train_shard, "totals.train is {'tokens': "),
    (keep_totals(drop_last_train_shard), "train_000002.bin: a shard that "),
    (lambda m: m["tokenizer"].update(eot=50255), "tokenizer gpt2 with n_vocab 50257, eot 50255, but gpt2 has"),
    (lambda m: m["tokenizer"].update(n_vocab=70000), "tokenizer n_vocab 70000 / eot 50256 do not fit"),
    (lambda m: m["shards"][0].update(name="../../etc/train_000000.bin"), "is not a train shard name"),
    (lambda m: m["shards"][1].update(name="train_000000.bin"), "or is listed twice"),
    (lambda m: m["shards"][0].update(bytes=1000), "shard train_000000.bin: 1000 bytes for 100000 tokens"),
    (lambda m: m["shards"][0].pop("edges_sha256"), "malformed manifest (KeyError: 'edges_sha256')"),
    (lambda m: m["shards"][0].update(documents="7"), "shard train_000000.bin: documents '7', sha256 "),
    (lambda m: m["shards"][0].update(sha256=None), "edges_sha256 '"),
    (lambda m: m["tokenizer"].update(n_vocab=float("inf")), "tokenizer n_vocab inf, eot 50256 (two JSON integers)"),
    (lambda m: m["tokenizer"].update(n_vocab=50257.9), "tokenizer n_vocab 50257.9, eot 50256 (two JSON integers)"),
    (lambda m: m["tokenizer"].update(n_vocab=50257.0), "tokenizer n_vocab 50257.0, eot 50256 (two JSON integers)"),
    (lambda m: m["tokenizer"].update(eot="50256"), "tokenizer n_vocab 50257, eot '50256' (two JSON integers)"),
    (lambda m: m["tokenizer"].update(eot=True), "tokenizer n_vocab 50257, eot True (two JSON integers)"),
    (lambda m: m["tokenizer"].update(eot=None), "tokenizer n_vocab 50257, eot None (two JSON integers)"),
])
def test_a_manifest_that_does_not_describe_its_files_is_refused_naming_it(tiny_dataset, tmp_path, edit, needle):
    ds = copy_of(tiny_dataset, tmp_path)
    manifest = edit_manifest(ds, edit)
    message = refusal(ds)
    assert needle in message and str(manifest) in message, message


@pytest.mark.parametrize("version, needle", [
    (None, "written by an earlier version of prep (dataset version 1; this one reads 2): prepare it again"),
    (1, "written by an earlier version of prep (dataset version 1; this one reads 2): prepare it again"),
    (3, "written by a newer version of prep (dataset version 3; this one reads 2): use that version"),
])
def test_a_dataset_of_another_format_version_is_refused_by_train_and_tokenize(tiny_dataset, tmp_path, version,
                                                                               needle, capsys):
    ds = copy_of(tiny_dataset, tmp_path)
    manifest = edit_manifest(ds, lambda m: m.pop("dataset_version") if version is None
                             else m.update(dataset_version=version))
    with pytest.raises(DatasetError) as err:
        Dataset(ds)
    assert str(err.value) == f"{manifest}: {needle}"
    docs = json.loads(manifest.read_text())["inputs"][0]["path"]
    assert prep_main(["tokenize", "--input", docs, "--out", str(ds), "--shard-tokens", "100000",
                      "--val-tokens", "20000"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {manifest}: {needle}"


def test_unfinished_work_of_an_earlier_version_is_refused(tiny_dataset, tmp_path, capsys):
    docs = json.loads((tiny_dataset / "manifest.json").read_text())["inputs"][0]["path"]
    out = tmp_path / "ds"
    command = ["tokenize", "--input", docs, "--out", str(out), "--task-index", "0", "--task-count", "2"]
    assert prep_main(command) == 0
    recipe = out / ".work" / "recipe.json"
    rcp = json.loads(recipe.read_text())
    assert rcp["format_version"] == 2
    recipe.write_text(json.dumps({**rcp, "format_version": 1}))
    capsys.readouterr()
    assert prep_main(command) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {recipe}: written by an earlier version of prep (dataset version 1; this one reads 2): "
        f"prepare it again")


def test_val_tokens_0_makes_a_dataset_without_validation_that_opens_and_verifies(tmp_path, shakespeare_docs, capsys):
    from tests.fixtures_data import write_jsonl
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in shakespeare_docs[:300]])
    out = tmp_path / "ds"
    assert prep_main(["tokenize", "--input", str(docs), "--out", str(out), "--shard-tokens", "5000",
                      "--val-tokens", "0"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"{out} has no validation split (--val-tokens 0): train on it with eval.every: 0")
    ds = Dataset(out)
    assert ds.files("val") == [] and len(ds.files("train")) == ds.manifest["totals"]["train"]["shards"] > 1
    assert ds.manifest["totals"]["val"] == {"tokens": 0, "documents": 0, "shards": 0}
    assert prep_main(["verify", str(out)]) == 0


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_device(path: Path) -> None:
    path.symlink_to("/dev/null")  # os.stat follows the link: a character device


# What train runs at start-up before reading a token (Dataset.files calls it), as one line or a traceback.
START_UP_CHECK = """
import sys
from common.errors import PipelineError
from prep.reader import Dataset
try:
    Dataset(sys.argv[1]).check_files()
except PipelineError as exc:
    sys.exit(f"error: {exc}")
"""


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("make, kind", [(make_fifo, "a named pipe"), (Path.mkdir, "a directory"),
                                        (make_device, "a character device")])
def test_a_shard_or_manifest_that_is_not_a_regular_file_is_refused_not_waited_on(tiny_dataset, tmp_path, make, kind):
    """open() of a named pipe waits for a writer for ever: verify (in one process and in workers) and train's
    start-up check must refuse it by name before opening it. The timeouts turn a regression into a failure."""
    ds = copy_of(tiny_dataset, tmp_path)
    shard = ds / "train_000001.bin"
    shard.unlink()
    make(shard)
    refused = f"error: {shard}: {kind}, not a regular file; a dataset holds only the files prep wrote: prepare " \
              f"the dataset again"
    for workers in ("1", "2"):
        done = subprocess.run([PYTHON, "-m", "prep", "verify", str(ds), "--workers", workers], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert one_error_line(done) == refused
    done = subprocess.run([PYTHON, "-c", START_UP_CHECK, str(ds)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert one_error_line(done) == refused
    assert os.path.lexists(shard) and sorted(p.name for p in ds.iterdir()) == sorted(
        p.name for p in tiny_dataset.iterdir())  # nothing deleted
    manifest = ds / "manifest.json"
    manifest.unlink()
    make(manifest)
    done = subprocess.run([PYTHON, "-m", "prep", "verify", str(ds)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert one_error_line(done).startswith(f"error: {manifest}: {kind}, not a regular file; ")
