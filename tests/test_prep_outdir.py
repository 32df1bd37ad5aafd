"""prep writes only into a directory that is new, empty, or its own; finalize removes only what prep wrote."""
from pathlib import Path

import pytest

from prep.__main__ import main as prep_main
from tests.fixtures_data import tree_bytes, write_jsonl


@pytest.fixture
def docs(tmp_path, shakespeare_docs) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in shakespeare_docs[:300]])


def tokenize(docs: Path, out: Path, *extra) -> int:
    return prep_main(["tokenize", "--input", str(docs), "--out", str(out), "--shard-tokens", "5000",
                      "--val-tokens", "1000", *extra])


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("layout", [{"notes.txt": b"mine"}, {".work/notes.txt": b"mine"},
                                    {"sub/train_000000.bin": b"x"}])
def test_a_non_empty_directory_that_is_not_a_dataset_is_refused_untouched(docs, tmp_path, capsys, layout):
    out = tmp_path / "out"
    for name, data in layout.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = tree_bytes(out)
    assert tokenize(docs, out) == 1
    error = last_error(capsys)
    assert error.startswith(f"error: {out}: not empty (") and "not a dataset (no manifest.json" in error, error
    assert tree_bytes(out) == before and sorted(p.name for p in out.iterdir()) == sorted(
        {name.split("/")[0] for name in layout})


def test_an_empty_directory_and_a_file_as_out(docs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert tokenize(docs, tmp_path / "empty") == 0
    assert (tmp_path / "empty" / "manifest.json").exists()
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert tokenize(docs, tmp_path / "file") == 1
    assert last_error(capsys) == f"error: {tmp_path / 'file'}: --out is a file, not a directory; give a new or empty directory"


def test_finalize_removes_only_the_files_prep_wrote_in_work(docs, tmp_path, capsys):
    out = tmp_path / "out"
    assert tokenize(docs, out, "--task-index", "0", "--task-count", "1") == 0
    foreign = [out / ".work" / "notes.txt", out / ".work" / "units" / "keep.me", out / ".work" / "shards" / "x.bin"]
    for path in foreign:
        path.parent.mkdir(exist_ok=True)
        path.write_text("not prep's")
    capsys.readouterr()
    assert prep_main(["finalize", "--out", str(out)]) == 0
    assert (out / "manifest.json").exists()
    assert sorted(p for p in (out / ".work").rglob("*") if p.is_file()) == sorted(foreign)
    assert all(p.read_text() == "not prep's" for p in foreign)
    assert f"warning: {out / '.work'} is left in place: it holds 3 file(s) prep did not write" in capsys.readouterr().err
    # Without foreign files .work/ goes whole, as before.
    for path in foreign:
        path.unlink()
    out2 = tmp_path / "out2"
    assert tokenize(docs, out2) == 0
    assert not (out2 / ".work").exists()
