"""Bad input: named errors (or counted skips), and a dataset dir that never holds a partial shard or a lying manifest."""
import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prep.__main__ import main as prep_main
from prep.reader import Dataset
from prep.shard import TokenRangeError, to_uint16
from tests.conftest import PYTHON, REPO
from tests.fixtures_data import tree_bytes, write_fineweb_parquet, write_jsonl
from tests.test_prep_inputs import tokenize


def assert_no_dataset(out):
    """After a failure: no manifest, and no shard (complete or temporary) outside .work/."""
    if out.exists():
        assert not (out / "manifest.json").exists()
        assert [p.name for p in out.iterdir() if p.name != ".work"] == []


def test_malformed_json_line_named_or_skipped_and_counted(tmp_path, shakespeare_docs, capsys):
    src = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": i, "text": d}) for i, d in enumerate(shakespeare_docs[:50])]
    lines[6] = '{"id": 6, "text": "unterminated'
    lines[20] = json.dumps({"id": 20, "body": "no text field"})
    src.write_text("\n".join(lines) + "\n")
    assert tokenize([src], tmp_path / "ds", "--val-tokens", 100) == 1
    err = capsys.readouterr().err
    assert f"error: {src}:7: malformed JSON (Invalid control character at column 32)" in err and "at at" not in err
    assert "rerun with --skip-bad-docs and a new --out: it changes the recipe" in err
    assert_no_dataset(tmp_path / "ds")
    assert tokenize([src], tmp_path / "ds2", "--val-tokens", 100, "--skip-bad-docs") == 0
    err = capsys.readouterr().err
    assert "bad 2" in err and f"skipped: {src}:21: no string field 'text'" in err
    stats = Dataset(tmp_path / "ds2").manifest["input_stats"]
    assert stats["bad_skipped"] == 2 and stats["documents"] == 48


def test_json_line_too_deep_or_with_a_huge_integer_is_a_bad_document_not_a_traceback(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + '\n{"text": "x", "id": ' + "1" * 5000
                   + '}\n{"text": "also fine"}\n')
    assert tokenize([src], tmp_path / "ds", "--val-tokens", 0) == 1
    err = capsys.readouterr().err
    assert f"error: {src}:2: nested too deeply to read" in err and "Traceback" not in err
    assert_no_dataset(tmp_path / "ds")
    assert tokenize([src], tmp_path / "ds2", "--val-tokens", 0, "--skip-bad-docs") == 0
    err = capsys.readouterr().err
    assert f"skipped: {src}:3: unreadable (Exceeds the limit (4300 digits)" in err
    assert Dataset(tmp_path / "ds2").manifest["input_stats"]["bad_skipped"] == 2


def test_parquet_without_text_column_named_or_skipped(tmp_path, shakespeare_docs, capsys):
    good = write_fineweb_parquet(tmp_path / "a.parquet", shakespeare_docs[:40], 10)
    bad = tmp_path / "b.parquet"
    pq.write_table(pa.table({"content": shakespeare_docs[40:60], "id": [str(i) for i in range(20)]}), bad)
    assert tokenize([good, bad], tmp_path / "ds", "--val-tokens", 100) == 1
    assert f"error: {bad}: parquet file has no column 'text' (columns: content, id)" in capsys.readouterr().err
    assert_no_dataset(tmp_path / "ds")
    assert tokenize([good, bad], tmp_path / "ds", "--val-tokens", 100, "--skip-bad-docs") == 0
    m = Dataset(tmp_path / "ds").manifest
    assert m["skipped_inputs"] == [{"path": str(bad), "rows": 20, "reason": "no column 'text'"}]
    assert m["input_stats"]["documents"] == 40
    assert tokenize([bad], tmp_path / "ds3", "--text-column", "content", "--val-tokens", 100) == 0


def test_corrupt_parquet_and_zst_named(tmp_path, shakespeare_docs, capsys):
    pq_file = write_fineweb_parquet(tmp_path / "a.parquet", shakespeare_docs[:40], 10)
    pq_file.write_bytes(pq_file.read_bytes()[:-100])
    assert tokenize([pq_file], tmp_path / "ds", "--val-tokens", 0) == 1
    assert f"error: {pq_file}: not a readable parquet file" in capsys.readouterr().err
    zst = write_jsonl(tmp_path / "b.jsonl.zst", [{"text": d} for d in shakespeare_docs[:200]])
    zst.write_bytes(zst.read_bytes()[:-50])
    assert tokenize([zst], tmp_path / "ds", "--val-tokens", 0) == 1
    assert f"error: {zst}: truncated zstd stream" in capsys.readouterr().err
    assert_no_dataset(tmp_path / "ds")


def test_a_parquet_footer_pyarrow_cannot_parse_is_one_error_line(tmp_path, capsys):
    garbage = tmp_path / "a.parquet"
    garbage.write_bytes(b"PAR1" + bytes(100) + b"PAR1")  # pyarrow's message for it ends in a newline
    assert tokenize([garbage], tmp_path / "ds", "--val-tokens", 0) == 1
    err = capsys.readouterr().err
    assert err.endswith(f"error: {garbage}: not a readable parquet file (Couldn't deserialize thrift: No more data "
                        f"to read.)\n"), err
    assert_no_dataset(tmp_path / "ds")


def test_invalid_utf8_replaced_and_counted_empty_docs_skipped(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff\xfe bytes"}\n{"text": ""}\n\n{"text": "also fine"}\n')
    texts = pa.array([b"ok", b"bad \xff here", b"", None], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": texts, "id": ["p0", "p1", "p2", "p3"]}), tmp_path / "docs.parquet")
    assert tokenize([src, tmp_path / "docs.parquet"], tmp_path / "ds", "--val-tokens", 0) == 0
    ds = Dataset(tmp_path / "ds")
    assert ds.manifest["input_stats"] == {"documents": 5, "empty_skipped": 3, "bad_skipped": 0,
                                          "invalid_utf8_replaced": 2}
    from common import tokenizer
    tokens = np.concatenate(ds.arrays("train"))
    assert tokenizer.decode(tokens) == ("<|endoftext|>fine<|endoftext|>bad \ufffd\ufffd bytes<|endoftext|>also fine"
                                        "<|endoftext|>ok<|endoftext|>bad \ufffd here")
    assert "empty 3" in capsys.readouterr().err


def test_null_text_is_empty_and_a_lone_surrogate_escape_is_replaced_and_counted(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "fine"}\n{"text": null}\n{"text": "lone \\ud83d here"}\n'
                   '{"text": "pair \\ud83d\\ude00 ok"}\n{"id": "\\udc00", "text": "odd id"}\n')
    assert tokenize([src], tmp_path / "ds", "--val-tokens", 0) == 0
    ds = Dataset(tmp_path / "ds")
    assert ds.manifest["input_stats"] == {"documents": 4, "empty_skipped": 1, "bad_skipped": 0,
                                          "invalid_utf8_replaced": 1}
    from common import tokenizer
    assert tokenizer.decode(np.concatenate(ds.arrays("train"))) == (
        "<|endoftext|>fine<|endoftext|>lone \ufffd here<|endoftext|>pair \U0001f600 ok<|endoftext|>odd id")


def test_truncated_manifest_on_rerun_names_the_file(tiny_dataset, tmp_path, capsys):
    import shutil
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    manifest = ds / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:200])
    args = ["--shard-tokens", "100000", "--val-tokens", "20000"]
    assert tokenize([tiny_dataset.parent / "docs.jsonl"], ds, *args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {manifest}:") and "a malformed manifest" in err and err.count("\n") == 1, err
    assert prep_main(["finalize", "--out", str(ds)]) == 0  # nothing to finalize: it touches no shard
    assert prep_main(["verify", str(ds)]) == 1
    assert "not valid JSON" in (err := capsys.readouterr().err) and f"error: {manifest}:" in err


def test_a_killed_worker_says_rerunning_resumes(tmp_path, fineweb_parquet, parquet_reference):
    from tests.fixtures_data import REFERENCE_RECIPE
    out = tmp_path / "ds"
    proc = subprocess.Popen([PYTHON, "-m", "prep", "tokenize", "--input", str(fineweb_parquet), "--out", str(out),
                             "--workers", "2", *REFERENCE_RECIPE], cwd=REPO, stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    while not ((out / ".work" / "units").exists() and children.read_text().split()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    os.kill(int(children.read_text().split()[0]), signal.SIGKILL)  # what the out-of-memory killer does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "error: a tokenize worker process died" in err and "rerun the same command to resume" in err
    assert prep_main(["tokenize", "--input", str(fineweb_parquet), "--out", str(out), *REFERENCE_RECIPE]) == 0
    assert tree_bytes(out) == parquet_reference


def test_empty_input_set_and_bad_flags(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "readme.md").write_text("nothing to tokenize")
    assert tokenize([tmp_path / "raw"], tmp_path / "ds") == 1
    assert "error: no input files (.parquet, .jsonl, .jsonl.zst, .txt) found in" in capsys.readouterr().err
    assert tokenize([tmp_path / "missing.jsonl"], tmp_path / "ds") == 2  # a flag naming nothing: a usage error
    assert "missing.jsonl: no such file or directory" in capsys.readouterr().err
    empty = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}])
    assert tokenize([empty], tmp_path / "ds", "--val-tokens", 0) == 1
    assert "no documents" in capsys.readouterr().err
    assert_no_dataset(tmp_path / "ds")
    assert tokenize([empty], tmp_path / "ds", "--task-index", 3, "--task-count", 2) == 2  # usage error
    assert "--task-index 3 is outside 0..1" in capsys.readouterr().err
    assert tokenize([empty], tmp_path / "ds", "--shard-tokens", 0) == 2
    assert "argument --shard-tokens: must be >= 1, got 0" in capsys.readouterr().err
    # The seed keys a blake2b hash, whose key is at most 64 bytes: refused up front, not a worker's traceback.
    assert tokenize([empty], tmp_path / "ds2", "--val-seed", 10**70) == 2
    err = capsys.readouterr().err
    assert "error: --val-seed must be from -9,223,372,036,854,775,807 to" in err and "Traceback" not in err
    assert not (tmp_path / "ds2").exists()


def test_val_tokens_larger_than_corpus_refused(tmp_path, shakespeare_docs, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in shakespeare_docs[:20]])
    assert tokenize([src], tmp_path / "ds", "--val-tokens", 10**9) == 1
    assert "--val-tokens 1,000,000,000 leaves no training data" in capsys.readouterr().err
    assert_no_dataset(tmp_path / "ds")


@pytest.mark.parametrize("val_tokens", [10**7, 1000], ids=["more-than-the-text", "one-document-takes-all"])
def test_a_txt_input_all_held_out_says_it_is_one_document_and_how_to_split_it(tmp_path, shared_dir, val_tokens,
                                                                               capsys):
    text = tmp_path / "book.txt"
    text.write_text((shared_dir / "data" / "tinyshakespeare.txt").read_text()[:20000])
    assert tokenize([text], tmp_path / "ds", "--val-tokens", val_tokens) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: --val-tokens {val_tokens:,} leaves no training data"), error
    assert (f"the inputs hold 1 document(s) (1 of them .txt files, each read as one whole document: split a text "
            f"into documents with `python slurm/demo_data.py OUT_DIR --text {text}`, or give .jsonl inputs") in error
    assert_no_dataset(tmp_path / "ds")


def test_token_id_beyond_uint16_refused():
    assert to_uint16(np.array([0, 50256, 65535], dtype=np.uint32), "x").tolist() == [0, 50256, 65535]
    with pytest.raises(TokenRangeError, match=r"docs.jsonl: token id 65536 does not fit in uint16"):
        to_uint16(np.array([5, 65536], dtype=np.uint32), "docs.jsonl")


def _run_with_file_size_limit(limit_bytes, args):
    """The real CLI with RLIMIT_FSIZE: writes past the limit fail with EFBIG, as writes to a full disk fail."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get an OSError instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([PYTHON, "-m", "prep", *map(str, args)], cwd=REPO, preexec_fn=limit,
                          capture_output=True, text=True)


def test_disk_full_during_tokenize_and_finalize_leaves_no_partial_output(tmp_path, shakespeare_docs):
    docs = shakespeare_docs[:3000]
    src = write_fineweb_parquet(tmp_path / "a.parquet", docs, 500)  # 6 units of ~25k tokens each
    args = ["tokenize", "--input", src, "--out", tmp_path / "ds", "--shard-tokens", 100000, "--val-tokens", 5000,
            "--unit-bytes", 1]
    # Unit files (~50 KB) do not fit under 20 KB: tokenize fails on the first unit.
    r = _run_with_file_size_limit(20_000, args)
    assert r.returncode == 1 and "error: " in r.stderr and "File too large" in r.stderr, r.stderr
    assert_no_dataset(tmp_path / "ds")
    assert [p.name for p in (tmp_path / "ds" / ".work" / "units").iterdir() if not p.name.startswith(".")] == []
    # Units fit under 120 KB but a 100k-token shard (200 KB) does not: finalize fails after the units are done.
    r = _run_with_file_size_limit(120_000, args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"error: {tmp_path / 'ds' / '.work' / 'shards' / 'train_000000.bin'}: File too large" in r.stderr, r.stderr
    assert_no_dataset(tmp_path / "ds")
    assert len(list((tmp_path / "ds" / ".work" / "units").glob("u*.json"))) == 6
    # With room again the rerun reuses the six units and produces what a clean run produces.
    assert prep_main([str(a) for a in args]) == 0
    clean = tmp_path / "clean"
    assert prep_main([str(a) for a in args[:4]] + [str(clean)] + [str(a) for a in args[5:]]) == 0
    assert tree_bytes(tmp_path / "ds") == tree_bytes(clean)
