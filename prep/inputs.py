"""Input discovery and reading: files and directories -> ordered units of work -> documents.

A unit is what one worker tokenizes and commits in one go: a whole .jsonl / .jsonl.zst / .txt file, or a run of
consecutive row groups of a parquet file (so one large FineWeb file spreads over many workers and array tasks).
Units are numbered in input order; that order, not the order they finish in, fixes the bytes of the dataset.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from common import files
from common.errors import PipelineError

SUFFIXES = (".parquet", ".jsonl", ".jsonl.zst", ".txt")
# With --unit-bytes 0 (auto), parquet row groups are packed into units of about total/TARGET_UNITS uncompressed
# bytes, within these bounds: enough units to keep many workers busy to the end, few enough files under .work/.
TARGET_UNITS = 2000
MIN_UNIT_BYTES, MAX_UNIT_BYTES = 1 << 20, 256 << 20
READ_BATCH_ROWS = 1024
# An input's fingerprint hashes this many bytes at each end (the whole file when it is at most twice as long):
# a parquet file's footer (schema, row-group offsets and statistics) lies in its last bytes, so a rewritten
# parquet file changes there, and ~1 MiB per file keeps the check to seconds for thousands of files.
HASHED_EDGE_BYTES = 512 << 10
# A JSON escape of a UTF-16 surrogate: only through one can a lone surrogate get into a decoded string.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class InputError(PipelineError):
    """Bad or missing input; the message names the file (and line or row group)."""


def file_kind(path: Path) -> str | None:
    name = path.name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix.lstrip(".")
    return None


def discover(paths: list[str]) -> list[Path]:
    """Expand files and directories (recursively, sorted) into the ordered list of input files (real paths)."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw).resolve()
        if p.is_dir():
            files.extend(_walk(p))
        elif p.is_file():
            if not file_kind(p):
                raise InputError(f"{p}: unsupported input type (expected {', '.join(SUFFIXES)})")
            files.append(p)
        else:
            raise InputError(f"{raw}: no such file or directory")
    if not files:
        raise InputError(f"no input files ({', '.join(SUFFIXES)}) found in: {' '.join(map(str, paths))}")
    seen = set()
    for f in files:
        if f in seen:
            raise InputError(f"{f}: given twice in --input (directly, or through a symbolic link)")
        seen.add(f)
    return files


def _walk(root: Path) -> list[Path]:
    """Input files under `root`, in sorted order, following symbolic links; each real file once.

    A link to a directory already being walked (a cycle) or already walked (a second link to it) is not entered
    again. Names starting with "." are skipped. A broken link with an input's suffix is an error, not a skip.
    """
    found: dict[Path, None] = {}  # real paths, in walk order (an insertion-ordered set)
    entered: set[tuple[int, int]] = set()

    def visit(directory: Path) -> None:
        st = directory.stat()
        if (st.st_dev, st.st_ino) in entered:
            return
        entered.add((st.st_dev, st.st_ino))
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir():  # follows links
                visit(path)
            elif entry.is_file():
                if file_kind(path):
                    found.setdefault(path.resolve(), None)
            elif entry.is_symlink() and file_kind(path):
                raise InputError(f"{path}: broken symbolic link (to {os.readlink(path)}); fix or remove it")

    visit(root)
    return list(found)


@dataclass(frozen=True)
class Unit:
    index: int
    path: str
    kind: str
    row_groups: tuple[int, ...] = ()  # parquet only

    def describe(self) -> str:
        if self.kind != "parquet":
            return self.path
        first, last = self.row_groups[0], self.row_groups[-1]
        return f"{self.path} row groups {first}-{last}" if first != last else f"{self.path} row group {first}"

    def to_dict(self) -> dict:
        return {"index": self.index, "path": self.path, "kind": self.kind, "row_groups": list(self.row_groups)}


def auto_unit_bytes(files: list[Path]) -> int:
    """The unit size for --unit-bytes 0: about TARGET_UNITS units over the whole input, within the bounds."""
    total = sum(_uncompressed_bytes(f) for f in files)
    return int(min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, total // TARGET_UNITS)))


def _uncompressed_bytes(path: Path) -> int:
    if file_kind(path) != "parquet":
        return path.stat().st_size
    meta = _parquet_metadata(path)
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def plan_units(files: list[Path], text_column: str, unit_bytes: int, skip_bad: bool,
               skipped: list[dict] | None = None) -> list[Unit]:
    """Split the input files into units; parquet files are checked for the text column here, up front."""
    units: list[Unit] = []
    for f in files:
        kind = file_kind(f)
        if kind != "parquet":
            units.append(Unit(len(units), str(f), kind))
            continue
        meta = _parquet_metadata(f)
        if text_column not in meta.schema.names:
            msg = f"{f}: parquet file has no column {text_column!r} (columns: {', '.join(meta.schema.names)})"
            if not skip_bad:
                raise InputError(msg + "; pass --text-column, or --skip-bad-docs to skip the file")
            if skipped is not None:
                skipped.append({"path": str(f), "rows": meta.num_rows, "reason": f"no column {text_column!r}"})
            continue
        group: list[int] = []
        size = 0
        for rg in range(meta.num_row_groups):
            group.append(rg)
            size += meta.row_group(rg).total_byte_size
            if size >= unit_bytes:
                units.append(Unit(len(units), str(f), kind, tuple(group)))
                group, size = [], 0
        if group:
            units.append(Unit(len(units), str(f), kind, tuple(group)))
    return units


def _parquet_metadata(path: Path):
    st = path.stat()
    return _parquet_metadata_of(path, st.st_size, st.st_mtime_ns)


def one_line(exc: Exception) -> str:
    """An exception's message as one line: pyarrow's end in a newline, or span several."""
    return " ".join(str(exc).split())


@functools.lru_cache(maxsize=64)
def _parquet_metadata_of(path: Path, size: int, mtime_ns: int):
    """Footer of one version of a parquet file (planning reads each footer twice)."""
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for corrupt or truncated files
        raise InputError(f"{path}: not a readable parquet file ({one_line(exc)})") from None


@dataclass
class ReadStats:
    """What reading skipped or repaired; summed over units into the manifest."""
    documents: int = 0
    empty: int = 0
    bad: int = 0
    invalid_utf8: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def add(self, other: "ReadStats") -> None:
        self.documents += other.documents
        self.empty += other.empty
        self.bad += other.bad
        self.invalid_utf8 += other.invalid_utf8
        self.bad_examples = (self.bad_examples + other.bad_examples)[:5]

    def to_dict(self) -> dict:
        return {"documents": self.documents, "empty_skipped": self.empty, "bad_skipped": self.bad,
                "invalid_utf8_replaced": self.invalid_utf8}


def decode_utf8(raw: bytes, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def read_documents(unit: Unit, text_column: str, skip_bad: bool, stats: ReadStats):
    """Yield batches of (key, text): key is the document's id when it has one, else None (hash the text)."""
    if unit.kind == "parquet":
        yield from _read_parquet(unit, text_column, skip_bad, stats)
    elif unit.kind == "txt":
        yield [(None, decode_utf8(Path(unit.path).read_bytes(), stats))]
    else:
        yield from _read_jsonl(unit, text_column, skip_bad, stats)


def json_error(exc: json.JSONDecodeError) -> str:
    """json's message with its column, read as one phrase ("... starting at column 12", "... at column 3")."""
    return f"{exc.msg} column {exc.colno}" if exc.msg.endswith(" at") else f"{exc.msg} at column {exc.colno}"


def replace_lone_surrogates(text: str, stats: ReadStats) -> str:
    """A JSON escape such as "\\ud83d" without its pair decodes to a string no UTF-8 encoder takes: replace each
    lone surrogate with U+FFFD and count the document as invalid UTF-8, as raw invalid bytes are."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        stats.invalid_utf8 += 1
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _bad(stats: ReadStats, skip_bad: bool, msg: str) -> None:
    if not skip_bad:
        raise InputError(msg + " (to skip and count such documents instead, rerun with --skip-bad-docs and a new "
                               "--out: it changes the recipe)")
    stats.bad += 1
    if len(stats.bad_examples) < 5:
        stats.bad_examples.append(msg)


def _read_jsonl(unit: Unit, text_column: str, skip_bad: bool, stats: ReadStats):
    batch = []
    with _open_lines(Path(unit.path)) as lines:
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            where = f"{unit.path}:{lineno}"
            try:
                obj = json.loads(decode_utf8(raw, stats))
            except json.JSONDecodeError as exc:
                _bad(stats, skip_bad, f"{where}: malformed JSON ({json_error(exc)})")
                continue
            except (RecursionError, ValueError) as exc:
                _bad(stats, skip_bad, f"{where}: {files.beyond_json(exc)}")
                continue
            text = obj.get(text_column) if isinstance(obj, dict) else None
            if text is None and isinstance(obj, dict) and text_column in obj:
                text = ""  # null text is an empty document, as a null in a parquet text column is
            if not isinstance(text, str):
                _bad(stats, skip_bad, f"{where}: no string field {text_column!r}")
                continue
            if SURROGATE_ESCAPE.search(raw):
                text = replace_lone_surrogates(text, stats)
            doc_id = obj.get("id")
            batch.append((None if doc_id is None else str(doc_id), text))
            if len(batch) >= READ_BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch


class _open_lines:
    """Binary line iterator over .jsonl or streamed .jsonl.zst (never decompressed whole into memory)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.raw = open(self.path, "rb")
        return _zst_lines(self.raw, self.path) if self.path.name.endswith(".zst") else self.raw

    def __exit__(self, *exc):
        self.raw.close()


def _zst_lines(raw, path: Path):
    """Lines of a (possibly multi-frame) zstd stream; a truncated last frame is an error, not a silent short read."""
    import zstandard
    dobj, pending, fed = zstandard.ZstdDecompressor().decompressobj(), b"", False
    try:
        while chunk := raw.read(1 << 20):
            while chunk:
                fed = True
                pending += dobj.decompress(chunk)
                chunk = b""
                if dobj.eof:  # frame finished: whatever follows starts the next frame
                    chunk, dobj, fed = dobj.unused_data, zstandard.ZstdDecompressor().decompressobj(), False
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"
    except zstandard.ZstdError as exc:
        raise InputError(f"{path}: cannot decompress ({exc})") from None
    if fed and not dobj.eof:
        raise InputError(f"{path}: truncated zstd stream (the last frame is incomplete)")
    if pending:
        yield pending


def _read_parquet(unit: Unit, text_column: str, skip_bad: bool, stats: ReadStats):
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(unit.path)
    columns = [text_column] + (["id"] if "id" in pf.schema_arrow.names else [])
    for rg in unit.row_groups:
        try:
            table = pf.read_row_group(rg, columns=columns, use_threads=False)  # the workers are the parallelism
        except Exception as exc:  # corrupt page / truncated file
            raise InputError(f"{unit.path} row group {rg}: cannot read ({one_line(exc)})") from None
        text_col = _text_column(table.column(text_column))
        if text_col is None:
            raise InputError(f"{unit.path} row group {rg}: column {text_column!r} is "
                             f"{table.column(text_column).type}, not text")
        ids = table.column("id").to_pylist() if "id" in columns else [None] * table.num_rows
        texts = _column_texts(text_col, stats)
        for start in range(0, table.num_rows, READ_BATCH_ROWS):
            batch = []
            for doc_id, text in zip(ids[start:start + READ_BATCH_ROWS], texts[start:start + READ_BATCH_ROWS]):
                batch.append((None if doc_id is None else str(doc_id), text))
            yield batch


def _text_column(col):
    """`col` as a string or binary column, or None when its values are not text.

    A dictionary-encoded column (a pandas category, a writer's choice for repetitive text) is decoded, and the
    view types (pyarrow >= 16 writes them) become their large forms: the text is the same whatever the layout.
    """
    import pyarrow as pa
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    for view, large in (("is_string_view", pa.large_string), ("is_binary_view", pa.large_binary)):
        is_view = getattr(pa.types, view, None)  # absent before pyarrow 16, which has no such type to read
        if is_view is not None and is_view(col.type):
            col = col.cast(large())
    kind = col.type
    if (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        return col
    return None


def _column_texts(col, stats: ReadStats) -> list:
    """Python strings of a text column; invalid UTF-8 (parquet does not enforce it) is replaced and counted."""
    import pyarrow as pa
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            return col.to_pylist()
        except UnicodeDecodeError:
            col = col.cast(pa.large_binary())
    return [None if raw is None else decode_utf8(raw, stats) for raw in col.to_pylist()]


def file_fingerprint(path: Path) -> dict:
    """What the recipe records of an input: path, size, modification time and a hash of its two ends."""
    st = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= 2 * HASHED_EDGE_BYTES:
            digest.update(f.read())
        else:
            digest.update(f.read(HASHED_EDGE_BYTES))
            f.seek(st.st_size - HASHED_EDGE_BYTES)
            digest.update(f.read(HASHED_EDGE_BYTES))
    fingerprint = {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                   "edges_sha256": digest.hexdigest()}
    check_unchanged(path, fingerprint, "rerun once nothing writes to it")  # not rewritten while being hashed
    return fingerprint


def check_unchanged(path, fingerprint: dict, advice: str) -> None:
    """Raise unless `path` still has the fingerprint's size and modification time (one cheap stat)."""
    st = os.stat(path)
    if (st.st_size, st.st_mtime_ns) != (fingerprint["bytes"], fingerprint["mtime_ns"]):
        raise InputError(f"{path}: changed while being read ({fingerprint['bytes']} -> {st.st_size} bytes, "
                         f"modification time {fingerprint['mtime_ns']} -> {st.st_mtime_ns} ns); {advice}")


def stable_hash(key: str, seed: int) -> int:
    """64-bit hash that is the same on every machine and Python version (not Python's salted hash())."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little")
