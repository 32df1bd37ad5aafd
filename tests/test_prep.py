"""prep tokenize end to end on the shared tiny_dataset: tokens, holdout rule, headers, reuse, verify."""
import json
import shutil

import numpy as np

from common import tokenizer
from prep.__main__ import main as prep_main
from prep.inputs import stable_hash
from prep.reader import Dataset
from prep.shard import HEADER_BYTES, MAGIC, read_header


def split_on_eot(tokens: np.ndarray) -> list[list[int]]:
    starts = np.nonzero(tokens == tokenizer.EOT_TOKEN)[0]
    assert len(tokens) == 0 or starts[0] == 0, "every split must start with a document's EOT"
    bounds = list(starts) + [len(tokens)]
    return [tokens[a + 1:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]


def documents_of(ds: Dataset, split: str) -> list[list[int]]:
    arrays = ds.arrays(split)
    return split_on_eot(np.concatenate(arrays)) if arrays else []


def test_tiny_dataset_tokens_match_tiktoken(tiny_dataset, shakespeare_docs):
    ds = Dataset(tiny_dataset)
    expected = [tokenizer.get_encoding().encode_ordinary(d) for d in shakespeare_docs]
    train, val = documents_of(ds, "train"), documents_of(ds, "val")
    assert len(train) + len(val) == len(expected)
    # The val documents are exactly the smallest-hash ids until 20,000 tokens (EOT included), in input order.
    by_hash = sorted(range(len(expected)), key=lambda i: (stable_hash(f"shakespeare-{i}", 0), i))
    chosen, total = set(), 0
    for i in by_hash:
        if total >= 20_000:
            break
        chosen.add(i)
        total += len(expected[i]) + 1
    assert [expected[i] for i in sorted(chosen)] == val
    assert [d for i, d in enumerate(expected) if i not in chosen] == train
    m = ds.manifest
    assert m["totals"]["val"]["tokens"] == total and m["validation"]["seed"] == 0 and "smallest" in m["validation"]["rule"]
    assert m["tokenizer"] == {"name": "gpt2", "n_vocab": 50257, "eot": 50256, "eot_placement": "prepend"}


def test_tiny_dataset_shards_have_llmc_headers_and_fixed_size(tiny_dataset):
    ds = Dataset(tiny_dataset)
    for split in ("train", "val"):
        shards = ds.split(split)
        assert [s.name for s in shards] == [f"{split}_{k:06d}.bin" for k in range(len(shards))]
        assert all(s.tokens == 100_000 for s in shards[:-1]) and 0 < shards[-1].tokens <= 100_000
        for s in shards:
            path = tiny_dataset / s.name
            header = np.fromfile(path, dtype="<i4", count=256)
            assert (header[0], header[1], header[2]) == (MAGIC, 1, s.tokens) and not header[3:].any()
            assert path.stat().st_size == HEADER_BYTES + 2 * s.tokens == read_header(path) * 2 + HEADER_BYTES
    assert not (tiny_dataset / ".work").exists()
    assert sorted(p.name for p in tiny_dataset.iterdir()) == sorted(["manifest.json"] + [s.name for s in ds.shards])


def test_rerun_same_recipe_is_noop_and_other_recipe_refused(tiny_dataset, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    before = {p.name: p.stat().st_mtime_ns for p in ds.iterdir()}
    src = str(tiny_dataset.parent / "docs.jsonl")
    args = ["tokenize", "--input", src, "--out", str(ds), "--shard-tokens", "100000", "--val-tokens", "20000"]
    assert prep_main(args) == 0
    err = capsys.readouterr().err
    assert "already a finished dataset with this recipe" in err and "nothing to do" in err
    assert {p.name: p.stat().st_mtime_ns for p in ds.iterdir()} == before
    assert prep_main(args[:-1] + ["25000"]) == 1
    err = capsys.readouterr().err
    assert "different recipe" in err and "validation.tokens: 20000 -> 25000" in err
    assert prep_main(args + ["--val-seed", "3", "--text-column", "body"]) == 1
    err = capsys.readouterr().err
    assert "validation.seed: 0 -> 3" in err and "text_column: 'text' -> 'body'" in err
    assert {p.name: p.stat().st_mtime_ns for p in ds.iterdir()} == before


def test_verify_catches_flipped_byte_and_truncation(tiny_dataset, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    assert prep_main(["verify", str(ds)]) == 0
    shard = ds / "train_000001.bin"
    data = bytearray(shard.read_bytes())
    data[HEADER_BYTES + 501] ^= 0x01
    shard.write_bytes(bytes(data))
    assert prep_main(["verify", str(ds)]) == 1
    assert "train_000001.bin: sha256" in capsys.readouterr().err
    data[HEADER_BYTES + 501] ^= 0x01
    shard.write_bytes(bytes(data[:-10]))
    assert prep_main(["verify", str(ds)]) == 1
    assert "train_000001.bin: file is" in capsys.readouterr().err
    shard.write_bytes(bytes(data))
    (ds / "val_000000.bin").write_bytes((ds / "val_000000.bin").read_bytes()[:HEADER_BYTES] +
                                        np.full(1, 60000, "<u2").tobytes() +
                                        (ds / "val_000000.bin").read_bytes()[HEADER_BYTES + 2:])
    assert prep_main(["verify", str(ds)]) == 1
    assert "val_000000.bin: token id 60000 >= n_vocab 50257" in capsys.readouterr().err


def test_info_prints_summary(tiny_dataset, capsys):
    assert prep_main(["info", str(tiny_dataset)]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "tokens" in out and "seed 0" in out
    m = json.loads((tiny_dataset / "manifest.json").read_text())
    assert f"{m['totals']['train']['tokens']:,} tokens" in out
