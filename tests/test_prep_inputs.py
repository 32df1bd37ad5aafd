"""prep tokenize on every input format, and output bytes that depend on neither workers nor array tasks."""
import numpy as np
import pytest

from common import tokenizer
from prep.__main__ import main as prep_main
from prep.reader import Dataset
from tests.fixtures_data import REFERENCE_RECIPE, tree_bytes, write_fineweb_parquet, write_jsonl
from tests.test_prep import documents_of


def tokenize(inputs, out, *extra) -> int:
    return prep_main(["tokenize", "--input", *map(str, inputs), "--out", str(out), *map(str, extra)])


def test_every_format_tokens_equal_tiktoken_in_input_order(tmp_path, shakespeare_docs):
    docs = shakespeare_docs[:600] + ["caf\u00e9 \u2014 \u4e2d\u6587 \U0001f600", "a literal <|endoftext|> is text"]
    parts = [docs[0:200], docs[200:350], docs[350:500], docs[500:]]
    raw = tmp_path / "raw"
    (raw / "b").mkdir(parents=True)
    write_fineweb_parquet(raw / "b" / "a.parquet", parts[0], 64)
    write_jsonl(raw / "b" / "b.jsonl", [{"id": f"j{i}", "text": d} for i, d in enumerate(parts[1])])
    write_jsonl(raw / "c.jsonl.zst", [{"text": d} for d in parts[2]])  # no id: holdout hashes the text
    txt = tmp_path / "one.txt"
    txt.write_text("\n\n".join(parts[3]), encoding="utf-8")  # a .txt file is one document
    (raw / "notes.md").write_text("not an input")
    assert tokenize([raw, txt], tmp_path / "ds", "--shard-tokens", 10000, "--val-tokens", 0, "--unit-bytes", 1) == 0
    ds = Dataset(tmp_path / "ds")
    enc = tokenizer.get_encoding()
    expected = [enc.encode_ordinary(d) for d in parts[0] + parts[1] + parts[2]] + [enc.encode_ordinary("\n\n".join(parts[3]))]
    assert documents_of(ds, "train") == expected
    assert ds.split("val") == [] and ds.manifest["input_stats"]["documents"] == len(expected)
    assert [f["path"].rsplit("/", 1)[-1] for f in ds.manifest["inputs"]] == ["a.parquet", "b.jsonl", "c.jsonl.zst", "one.txt"]
    assert all(int(a.max()) < 50257 for a in ds.arrays("train"))


def test_workers_and_array_tasks_give_identical_bytes(tmp_path, fineweb_parquet, parquet_reference, capsys):
    common = REFERENCE_RECIPE
    assert tokenize([fineweb_parquet], tmp_path / "w2", *common, "--workers", 2) == 0
    assert tree_bytes(tmp_path / "w2") == parquet_reference
    tasks = tmp_path / "tasks"
    for i in (2, 0):  # out of order, and one task still missing
        assert tokenize([fineweb_parquet], tasks, *common, "--task-index", i, "--task-count", 3) == 0
    assert not (tasks / "manifest.json").exists()
    capsys.readouterr()
    assert prep_main(["finalize", "--out", str(tasks)]) == 1
    assert "5 of 15 unit(s) are not tokenized yet (first: u000001" in capsys.readouterr().err
    assert tokenize([fineweb_parquet], tasks, *common, "--task-index", 1, "--task-count", 3, "--workers", 2) == 0
    assert tokenize([fineweb_parquet], tasks, *common, "--task-index", 1, "--task-count", 3) == 0
    assert "skipping 5 unit(s) already done" in capsys.readouterr().err
    assert prep_main(["finalize", "--out", str(tasks)]) == 0
    assert tree_bytes(tasks) == parquet_reference
    ds = Dataset(tasks)
    assert [s.tokens for s in ds.split("train")][:-1] == [60000] * (len(ds.split("train")) - 1)
    assert ds.manifest["validation"]["tokens"] >= 15000


def test_shard_boundaries_do_not_split_or_drop_documents(tmp_path, fineweb_parquet, shakespeare_docs):
    assert tokenize([fineweb_parquet], tmp_path / "ds", "--shard-tokens", 777, "--val-tokens", 3000) == 0
    ds = Dataset(tmp_path / "ds")
    train = np.concatenate(ds.arrays("train"))
    assert all(s.tokens == 777 for s in ds.split("train")[:-1])
    enc = tokenizer.get_encoding()
    total = sum(len(enc.encode_ordinary(d)) + 1 for d in shakespeare_docs)
    assert len(train) + ds.manifest["totals"]["val"]["tokens"] == total
    assert sum(s.documents for s in ds.shards) == len(shakespeare_docs)


def test_finalize_refuses_a_damaged_unit(tmp_path, fineweb_parquet, capsys):
    out = tmp_path / "ds"
    assert tokenize([fineweb_parquet], out, *REFERENCE_RECIPE, "--task-index", 0, "--task-count", 1) == 0
    unit = out / ".work" / "units" / "u000003.bin"
    data = bytearray(unit.read_bytes())
    data[-1] ^= 0xFF
    unit.write_bytes(bytes(data))
    assert prep_main(["finalize", "--out", str(out)]) == 1
    assert "u000003.bin: does not match its done marker" in capsys.readouterr().err
    assert not (out / "manifest.json").exists() and not list(out.glob("*.bin"))
    (out / ".work" / "units" / "u000003.json").unlink()
    assert tokenize([fineweb_parquet], out, *REFERENCE_RECIPE) == 0
    assert "skipping 14 unit(s) already done" in capsys.readouterr().err


def with_text_as(source, dest, layout: str):
    """A copy of the parquet file `source` (same rows and row groups) whose text column has another arrow layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pq.read_table(source)
    text = table.column("text")
    if layout == "dictionary":
        text = text.dictionary_encode()
    elif layout == "numbers":
        text = pa.chunked_array([pa.array(range(len(text)))])
    else:
        if not hasattr(pa, layout):
            pytest.skip(f"pyarrow {pa.__version__} has no {layout}")
        text = text.cast(getattr(pa, layout)())
    table = table.set_column(table.schema.get_field_index("text"), "text", text)
    pq.write_table(table, dest, row_group_size=pq.ParquetFile(source).metadata.row_group(0).num_rows)
    assert pq.read_schema(dest).field("text").type == text.type  # read back in the layout it was written in
    return dest


@pytest.mark.parametrize("layout", ["dictionary", "large_string", "string_view"])
def test_a_dictionary_encoded_large_or_view_text_column_gives_the_plain_strings_tokens(tmp_path, fineweb_parquet,
                                                                                     parquet_reference, layout):
    src = with_text_as(fineweb_parquet, tmp_path / "text.parquet", layout)
    assert tokenize([src], tmp_path / "ds", *REFERENCE_RECIPE) == 0
    shards = {name: data for name, data in tree_bytes(tmp_path / "ds").items() if name.endswith(".bin")}
    assert shards == {name: data for name, data in parquet_reference.items() if name.endswith(".bin")}
    assert len(shards) > 2


def test_a_text_column_of_numbers_is_refused_naming_file_row_group_and_type(tmp_path, fineweb_parquet, capsys):
    src = with_text_as(fineweb_parquet, tmp_path / "numbers.parquet", "numbers")
    assert tokenize([src], tmp_path / "ds", *REFERENCE_RECIPE, "--workers", 1) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {src} row group 0: column 'text' is int64, not text")
    assert not (tmp_path / "ds" / "manifest.json").exists()
