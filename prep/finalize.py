"""`prep finalize`: committed units -> fixed-size train/val shards -> manifest.json (last) -> remove .work/.

Everything here is a pure function of the committed units, taken in unit (= input) order, so the shards do not
depend on how many workers or array tasks made the units. Finalize can be killed and rerun at any point: shards
are rewritten whole under temporary names, and the manifest, which makes the directory a dataset, comes last.
It runs under the dataset lock, held exclusively (prep.workdir), so no other prep process is in the directory.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import sys
from pathlib import Path

import numpy as np

from common import files, progress, tokenizer
from common.errors import PipelineError

from .inputs import ReadStats, Unit
from .reader import MANIFEST, read_manifest
from .recipe import refuse_if_different
from .shard import HEADER_BYTES, make_header, open_shard
from .workdir import INDEX_DTYPE, dataset_lock, is_done, load_json, unit_paths, work_dir

SPLITS = ("train", "val")
WRITE_CHUNK = 1 << 24  # tokens per write: bounds finalize's memory whatever the shard size


class FinalizeError(PipelineError):
    pass


def already_finished(out: Path, rcp: dict, clean: bool = True) -> int:
    """A rerun on a finished dataset: refuse a different recipe, else nothing to do.

    clean=True (only while holding the dataset lock exclusively) also removes a .work/ left by a finalize killed
    between writing the manifest and removing .work/.
    """
    manifest = read_manifest(out / MANIFEST)
    refuse_if_different(manifest.get("recipe", {}), rcp, "a finished dataset", out)
    if clean and work_dir(out).exists():
        shutil.rmtree(work_dir(out), ignore_errors=True)
    totals = manifest["totals"]
    print(f"{out} is already a finished dataset with this recipe ({totals['train']['tokens']:,} train + "
          f"{totals['val']['tokens']:,} val tokens); nothing to do", file=sys.stderr)
    return 0


def finalize(out: Path, wait: bool = False) -> int:
    """The `prep finalize` command: take the dataset lock exclusively, then finalize_locked."""
    out = Path(out).resolve()
    if (out / MANIFEST).exists() and not work_dir(out).exists():
        print(f"{out} is already finalized; nothing to do", file=sys.stderr)
        return 0
    if not (work_dir(out) / "recipe.json").exists():
        raise FinalizeError(f"{out}: nothing to finalize (no .work/recipe.json; run `python -m prep tokenize` first)")
    with dataset_lock(out, wait):
        return finalize_locked(out)


def finalize_locked(out: Path) -> int:
    """Committed units -> shards -> manifest -> no .work/; the caller holds the dataset lock exclusively."""
    recipe_file = work_dir(out) / "recipe.json"
    if (out / MANIFEST).exists():  # finished by another process while this one waited, or killed before cleanup
        if recipe_file.exists():
            return already_finished(out, load_json(recipe_file, "recipe"))
        shutil.rmtree(work_dir(out), ignore_errors=True)
        print(f"{out} is already finalized; nothing to do", file=sys.stderr)
        return 0
    if not recipe_file.exists():
        raise FinalizeError(f"{out}: nothing to finalize (no .work/recipe.json; run `python -m prep tokenize` first)")
    rcp = load_json(recipe_file, "recipe")
    plan = load_json(work_dir(out) / "plan.json", "unit plan")
    units = [Unit(u["index"], u["path"], u["kind"], tuple(u["row_groups"])) for u in plan["units"]]
    missing = [u for u in units if not is_done(out, u)]
    if missing:
        raise FinalizeError(f"{out}: {len(missing)} of {len(units)} unit(s) are not tokenized yet (first: "
                            f"u{missing[0].index:06d} = {missing[0].describe()}); run the remaining array tasks, "
                            f"or `python -m prep tokenize` without --task-index/--task-count")
    markers = [load_json(unit_paths(out, u.index)["done"], "done marker") for u in units]
    indexes = [np.load(unit_paths(out, u.index)["index"], mmap_mode="r") for u in units]  # 16 bytes a document
    for u, m, idx in zip(units, markers, indexes):
        if idx.dtype != INDEX_DTYPE or len(idx) != m["documents"] or int(idx["tokens"].sum()) != m["tokens"]:
            raise FinalizeError(f"{unit_paths(out, u.index)['index']}: does not match its done marker; "
                                f"delete {unit_paths(out, u.index)['done']} and rerun tokenize to redo the unit")
    if sum(m["tokens"] for m in markers) == 0:
        raise FinalizeError(f"{out}: the inputs hold no documents with text "
                            f"({sum(m['stats']['empty_skipped'] for m in markers)} empty, "
                            f"{sum(m['stats']['bad_skipped'] for m in markers)} bad)")
    val_sets = select_validation(indexes, rcp["validation"]["tokens"])
    files.remove_stale_tmp(out)  # leftovers of killed finalizers; safe: no other prep process is here
    writers = {s: SplitWriter(out, s, _split_tokens(indexes, val_sets, s == "val"), rcp["shard_tokens"])
               for s in SPLITS}
    total_tokens = sum(m["tokens"] for m in markers)
    try:
        with progress.bar(total=total_tokens, desc="finalize", unit="tok", unit_scale=True) as bar:
            for u, m, idx, val in zip(units, markers, indexes, val_sets):
                tokens = open_shard(unit_paths(out, u.index)["tokens"])
                if len(tokens) != m["tokens"] or hashlib.sha256(tokens.data).hexdigest() != m["tokens_sha256"]:
                    raise FinalizeError(f"{unit_paths(out, u.index)['tokens']}: does not match its done marker "
                                        f"(damaged on disk?); delete {unit_paths(out, u.index)['done']} and rerun "
                                        f"tokenize to redo the unit")
                for start, end, is_val in _runs(idx["tokens"], val):
                    writers["val" if is_val else "train"].write(tokens[start:end])
                    bar.update(end - start)
    except BaseException:
        for w in writers.values():
            w.abort()  # no shards without a manifest, not even complete ones
        raise
    shards = writers["train"].shards + writers["val"].shards
    manifest = _manifest(out, rcp, plan, markers, shards, writers)
    files.write_json(out / MANIFEST, manifest)
    shutil.rmtree(work_dir(out))  # with the lock file in it (see prep.workdir)
    t, v = manifest["totals"]["train"], manifest["totals"]["val"]
    print(f"finalized {out}: train {t['tokens']:,} tokens / {t['documents']:,} docs in {t['shards']} shard(s), "
          f"val {v['tokens']:,} tokens / {v['documents']:,} docs in {v['shards']} shard(s)", file=sys.stderr)
    return 0


def select_validation(indexes: list[np.ndarray], val_tokens: int) -> list[np.ndarray]:
    """Per unit, the sorted positions of its validation documents (see recipe.VAL_RULE).

    Only documents under a hash threshold are gathered and sorted, so memory follows the validation size, not the
    corpus; the threshold starts at about twice the needed fraction and grows until enough tokens are under it.
    """
    empty = [np.zeros(0, dtype=np.int64) for _ in indexes]
    if val_tokens == 0:
        return empty
    total = sum(int(idx["tokens"].sum()) for idx in indexes)
    if val_tokens >= total:
        raise FinalizeError(f"--val-tokens {val_tokens:,} leaves no training data: the inputs hold {total:,} tokens")
    fraction = min(1.0, 2.0 * val_tokens / total + 1e-6)
    while True:
        threshold = np.uint64(min(int(fraction * 2**64), 2**64 - 1))
        cand = [(u, np.nonzero(idx["hash"] <= threshold)[0]) for u, idx in enumerate(indexes)]
        hashes = np.concatenate([indexes[u]["hash"][pos] for u, pos in cand])
        lengths = np.concatenate([indexes[u]["tokens"][pos] for u, pos in cand])
        units = np.concatenate([np.full(len(pos), u) for u, pos in cand])
        positions = np.concatenate([pos for _, pos in cand])
        order = np.lexsort((positions, units, hashes))  # hash first; input order breaks (unlikely) ties
        cum = np.cumsum(lengths[order])
        if len(cum) and cum[-1] >= val_tokens:
            chosen = order[: int(np.searchsorted(cum, val_tokens)) + 1]
            break
        fraction = min(1.0, fraction * 4)
    result = []
    for u in range(len(indexes)):
        result.append(np.sort(positions[chosen][units[chosen] == u]))
    return result


def _split_tokens(indexes, val_sets, val: bool) -> int:
    return sum(int(idx["tokens"][v].sum()) if val else int(idx["tokens"].sum() - idx["tokens"][v].sum())
               for idx, v in zip(indexes, val_sets))


def _runs(lengths: np.ndarray, val_positions: np.ndarray):
    """(start, end, is_val) token ranges of a unit: maximal runs of consecutive documents in one split."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    cursor = 0
    for pos in val_positions:
        if pos > cursor:
            yield int(offsets[cursor]), int(offsets[pos]), False
        yield int(offsets[pos]), int(offsets[pos + 1]), True
        cursor = pos + 1
    if cursor < len(lengths):
        yield int(offsets[cursor]), int(offsets[-1]), False


class SplitWriter:
    """Streams one split's tokens into full shards of shard_tokens (the last one short), each written atomically."""

    def __init__(self, out: Path, split: str, total: int, shard_tokens: int):
        self.out, self.split, self.total, self.shard_tokens = out, split, total, shard_tokens
        self.shards: list[dict] = []
        self.written = 0
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                self._open()
            room = self._count - self._filled
            for i in range(0, min(room, len(tokens)), WRITE_CHUNK):
                piece = np.asarray(tokens[i: min(i + WRITE_CHUNK, room, len(tokens))])
                data = piece.tobytes()
                self._write(data)
                self._sha.update(data)
                self._docs += int(np.count_nonzero(piece == tokenizer.EOT_TOKEN))
            n = min(room, len(tokens))
            self._filled += n
            self.written += n
            tokens = tokens[n:]
            if self._filled == self._count:
                self._close()

    def _open(self) -> None:
        k = len(self.shards)
        self._name = f"{self.split}_{k:06d}.bin"
        self._count = min(self.shard_tokens, self.total - self.written)
        self._filled, self._docs = 0, 0
        self._cm = files.atomic_file(self.out / self._name)
        self._file = self._cm.__enter__()
        header = make_header(self._count)
        self._write(header)
        self._sha = hashlib.sha256(header)

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            if exc.filename is not None:
                raise
            # A full disk, a quota or a file size limit names no file: name the shard (its temporary is removed).
            raise OSError(exc.errno, exc.strerror, str(self.out / self._name)) from exc

    def _close(self) -> None:
        self._cm.__exit__(None, None, None)
        self._file = None
        self.shards.append({"name": self._name, "split": self.split, "tokens": self._count,
                            "documents": self._docs, "sha256": self._sha.hexdigest(),
                            "bytes": HEADER_BYTES + 2 * self._count})

    def abort(self) -> None:
        """After a failure: remove the shard being written and the ones finished by this run."""
        if self._file is not None:
            self._cm.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._file = None
        for shard in self.shards:
            (self.out / shard["name"]).unlink(missing_ok=True)


def _manifest(out, rcp, plan, markers, shards, writers) -> dict:
    stats = ReadStats()
    for m in markers:
        stats.add(ReadStats(m["stats"]["documents"], m["stats"]["empty_skipped"], m["stats"]["bad_skipped"],
                            m["stats"]["invalid_utf8_replaced"]))
    val_docs = sum(s["documents"] for s in shards if s["split"] == "val")
    totals = {s: {"tokens": w.total, "documents": sum(x["documents"] for x in w.shards), "shards": len(w.shards)}
              for s, w in writers.items()}
    try:
        version = importlib.metadata.version("gpt2-pipeline")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "format": {"name": "llm.c token shards", "version": 1, "magic": 20240520, "header_bytes": HEADER_BYTES,
                   "dtype": "uint16 little-endian", "sha256_of": "whole file (header + tokens)"},
        "tokenizer": dict(rcp["tokenizer"]),
        "source": source_of(rcp),
        "inputs": rcp["inputs"],
        "skipped_inputs": plan["skipped_inputs"],
        "validation": {"rule": rcp["validation"]["rule"], "seed": rcp["validation"]["seed"],
                       "requested_tokens": rcp["validation"]["tokens"], "tokens": totals["val"]["tokens"],
                       "documents": val_docs},
        "input_stats": stats.to_dict(),
        "totals": totals,
        "shards": shards,
        "recipe": rcp,
        "created_by": f"gpt2-pipeline {version} (python -m prep)",
    }


def source_of(rcp: dict) -> dict:
    """What `prep download` recorded (dataset id, sample, revision) for the raw directories the inputs came from."""
    records: dict[Path, dict] = {}
    for f in rcp["inputs"]:
        raw = next((p for p in Path(f["path"]).parents if (p / "download.json").exists()), None)
        if raw is None:
            continue
        if raw not in records:
            rec = load_json(raw / "download.json", "download record")
            records[raw] = {**{k: rec.get(k) for k in ("repo_id", "dataset", "sample", "dump", "revision", "pattern")},
                            "files_listed": len(rec.get("files", [])), "files_used": 0}
        records[raw]["files_used"] += 1
    if not records:
        return {"kind": "local files"}
    parts = list(records.values())
    return {"kind": "huggingface", **parts[0]} if len(parts) == 1 else {"kind": "huggingface", "parts": parts}

