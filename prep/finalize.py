"""`prep finalize`: committed units -> fixed-size train/val shards -> manifest.json (last) -> remove .work/.

Everything here is a pure function of the committed units, taken in unit (= input) order, so the shards do not
depend on how many workers or array tasks made the units, nor on how many tasks finalize them. prep.layout says
which unit byte ranges make each train shard; array task I of N (`--task-index I --task-count N`) writes its
contiguous run of train shards into DS/.work/shards/, each under a temporary name, renamed when complete, then
marked done (its sha256 in the mark), and removes a unit's token file once every train shard that reads it is
done, so the extra disk stays about one shard per task rather than the whole dataset. The last step, run by
whichever task finds every train shard done (or by a plain `prep finalize`, which writes any shard still missing
itself), writes the validation shards, moves all shards into DS/, writes the manifest, and removes .work/.

Killed anywhere and rerun: a done shard is skipped (its units may be gone), a shard not done still has all its
units, and the last step redoes only what it finds undone. A plain finalize, and the last step, hold the dataset
lock exclusively; array tasks hold it shared plus their own task lock (prep.workdir).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import files, progress, tokenizer
from common.errors import PipelineError

from .inputs import ReadStats, Unit
from .layout import Layout, LayoutError, load_or_build
from .reader import DATASET_VERSION, MANIFEST, read_manifest
from .recipe import refuse_if_different
from .shard import HEADER_BYTES, edges_sha256, make_header, open_shard
from .verify import verify as verify_dataset
from .workdir import (INDEX_DTYPE, dataset_lock, holdout_path, is_done, load_json, remove_stale_tmp,
                      remove_work_dir, shard_paths, shards_dir, task_lock, unit_paths, work_dir)

WRITE_CHUNK = 1 << 24  # tokens per write: bounds finalize's memory whatever the shard size


class FinalizeError(PipelineError):
    pass


def already_finished(out: Path, rcp: dict, clean: bool = True) -> int:
    """A rerun on a finished dataset: refuse a different recipe, else nothing to do.

    clean=True (only while holding the dataset lock exclusively) also removes a .work/ left by a finalize killed
    between writing the manifest and removing .work/.
    """
    manifest = read_manifest(out / MANIFEST)
    if clean and work_dir(out).exists():
        # Before a refusal too: a process that waited for the lock made .work/ anew for it, and leaves it otherwise.
        clean_up(out)
    refuse_if_different(manifest["recipe"], rcp, "a finished dataset", out)
    totals = manifest["totals"]
    print(f"{out} is already a finished dataset with this recipe ({totals['train']['tokens']:,} train + "
          f"{totals['val']['tokens']:,} val tokens); nothing to do", file=sys.stderr)
    return 0


def finalize(out: Path, wait: bool = False, task_index: int | None = None, task_count: int | None = None,
             verify: bool = False) -> int:
    """The `prep finalize` command: everything under the exclusive dataset lock, or one array task's shards.

    verify=True: the process that writes the manifest then checks every shard as `prep verify` does, with a worker
    per CPU it may use (the others, and runs that find the dataset finished, check nothing), so an array verifies
    once.
    """
    out = Path(out).resolve()
    if (out / MANIFEST).exists() and not work_dir(out).exists():
        print(f"{out} is already finalized; nothing to do", file=sys.stderr)
        return 0
    finished = (out / MANIFEST).exists()
    if not finished and not (work_dir(out) / "recipe.json").exists():
        raise FinalizeError(f"{out}: nothing to finalize (no .work/recipe.json; run `python -m prep tokenize` first)")
    # A finished dataset with a .work/ is a last step killed while removing it (recipe.json goes first): the
    # removal is finished under the exclusive lock, which an array task too waits for, as the last step does.
    if task_count is None or finished:
        with dataset_lock(out, wait or task_count is not None):
            return finalize_locked(out, verify)
    with dataset_lock(out, wait, shared=True):
        if (out / MANIFEST).exists():  # finished by others while this task waited for the lock
            print(f"{out} is already finalized; nothing to do", file=sys.stderr)
            return 0
        with task_lock(out, task_index, task_count, wait, stage="finalize"):
            work = open_work(out)
            write_train_shards(work, work.layout.task_shards(task_index, task_count),
                               f"finalize task {task_index}/{task_count}")
    # The tasks' locks are released: the task that finds every train shard done takes the lock exclusively (once
    # the others have let go of it) and does the last step; a second one to get there finds the dataset finished.
    left = work.missing_train_shards()
    if (out / MANIFEST).exists():  # checked after `left`: the manifest is written before the marks go
        print(f"{out} was finalized by another task", file=sys.stderr)
        return 0
    if left:
        print(f"{len(left)} of {work.layout.n_shards['train']} train shard(s) are left to other finalize tasks; "
              f"the last of them writes {out / MANIFEST}", file=sys.stderr)
        return 0
    with dataset_lock(out, wait=True):
        return finalize_locked(out, verify)


def finalize_locked(out: Path, verify: bool = False) -> int:
    """Units -> every shard still missing -> manifest -> no .work/; the caller holds the dataset lock exclusively."""
    recipe_file = work_dir(out) / "recipe.json"
    if (out / MANIFEST).exists():  # finished by another process while this one waited, or killed before cleanup
        if recipe_file.exists():
            return already_finished(out, load_json(recipe_file, "recipe"))
        clean_up(out)
        print(f"{out} is already finalized; nothing to do", file=sys.stderr)
        return 0
    if not recipe_file.exists():
        raise FinalizeError(f"{out}: nothing to finalize (no .work/recipe.json; run `python -m prep tokenize` first)")
    work = open_work(out)
    write_train_shards(work, range(work.layout.n_shards["train"]), "finalize")
    complete(work)
    return verify_dataset(out) if verify else 0


@dataclass
class Work:
    """What finalize reads from DS/.work/: the recipe, the unit plan, the units' done markers, the layout."""
    out: Path
    rcp: dict
    plan: dict
    units: list[Unit]
    markers: list[dict]
    layout: Layout

    def shard_done(self, name: str) -> bool:
        return shard_paths(self.out, name)["done"].exists()

    def missing_train_shards(self) -> list[int]:
        return [k for k in range(self.layout.n_shards["train"]) if not self.shard_done(self.layout.shard_name("train", k))]


def open_work(out: Path) -> Work:
    """Read .work/ and check that every unit is committed; the layout is computed by the first process to need it."""
    rcp = load_json(work_dir(out) / "recipe.json", "recipe")
    plan = load_json(work_dir(out) / "plan.json", "unit plan")
    units = [Unit(u["index"], u["path"], u["kind"], tuple(u["row_groups"])) for u in plan["units"]]
    missing = [u for u in units if not is_done(out, u)]
    if missing:
        raise FinalizeError(f"{out}: {len(missing)} of {len(units)} unit(s) are not tokenized yet (first: "
                            f"u{missing[0].index:06d} = {missing[0].describe()}); run the remaining array tasks, "
                            f"or `python -m prep tokenize` without --task-index/--task-count")
    markers = [load_json(unit_paths(out, u.index)["done"], "done marker") for u in units]
    layout = load_or_build(out, lambda: _build_layout(out, rcp, units, markers))
    if len(layout.unit_tokens) != len(units) or layout.shard_tokens != rcp["shard_tokens"]:
        raise FinalizeError(f"{work_dir(out) / 'layout.npz'}: made for another unit plan or shard size; delete it "
                            f"and rerun finalize")
    return Work(out, rcp, plan, units, markers, layout)


def _build_layout(out: Path, rcp: dict, units: list[Unit], markers: list[dict]) -> Layout:
    indexes = [_load_index(out, u) for u in units]  # 16 bytes a document
    for u, m, idx in zip(units, markers, indexes):
        if idx.dtype != INDEX_DTYPE or len(idx) != m["documents"] or int(idx["tokens"].sum()) != m["tokens"]:
            raise FinalizeError(f"{unit_paths(out, u.index)['index']}: does not match its done marker; "
                                f"delete {unit_paths(out, u.index)['done']} and rerun tokenize to redo the unit")
    if sum(m["tokens"] for m in markers) == 0:
        raise FinalizeError(f"{out}: the inputs hold no documents with text "
                            f"({sum(m['stats']['empty_skipped'] for m in markers)} empty, "
                            f"{sum(m['stats']['bad_skipped'] for m in markers)} bad)")
    try:
        return Layout.build(indexes, rcp["validation"]["tokens"], rcp["shard_tokens"])
    except LayoutError as exc:
        n_docs = sum(m["documents"] for m in markers)
        txt = [u.path for u in units if u.kind == "txt"]
        hint = (f" ({len(txt)} of them .txt files, each read as one whole document: split a text into documents "
                f"with `python slurm/demo_data.py OUT_DIR --text {txt[0]}`, or give .jsonl inputs, one JSON "
                f"document a line with its text in --text-column)") if txt else ""
        raise LayoutError(f"{exc}; the inputs hold {n_docs:,} document(s){hint}, and the validation split takes "
                          f"whole documents") from None


def _load_index(out: Path, unit: Unit) -> np.ndarray:
    paths = unit_paths(out, unit.index)
    try:  # np.load never unpickles here (allow_pickle defaults to False): an object array is a ValueError too
        return np.load(paths["index"], mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as exc:
        said = str(exc).split(". ")[0].rstrip(".")  # not numpy's advice to load it with pickle
        raise FinalizeError(f"{paths['index']}: damaged ({said}); delete {paths['done']} and rerun tokenize to redo "
                            f"the unit") from None


def write_train_shards(work: Work, shards: range, label: str) -> None:
    """Write each train shard of `shards` not yet done (with its units' holdout), mark it, release spent units."""
    layout, out = work.layout, work.out
    todo = [k for k in shards if not work.shard_done(layout.shard_name("train", k))]
    shards_dir(out).mkdir(exist_ok=True)
    verified: dict[int, np.ndarray] = {}
    removed = 0
    start = time.monotonic()
    n_tokens = sum(layout.shard_count("train", k) for k in todo)
    with progress.bar(total=n_tokens, desc=label, unit="tok", unit_scale=True) as bar:
        for k in todo:
            name = layout.shard_name("train", k)
            if work.shard_done(name):  # written meanwhile by another run (say, an array of another size)
                bar.update(layout.shard_count("train", k))
                continue
            tokens = {u: verified.get(u) for u in layout.units_read_by(k)}
            for u, arr in tokens.items():
                if arr is None:
                    tokens[u] = verified[u] = _open_unit(work, u, name)
            holdout = None
            if layout.holdout_tokens[k]:
                holdout = _write_shard(holdout_path(out, k), "val", int(layout.holdout_tokens[k]),
                                       (tokens[p.source][p.start:p.end] for p in layout.holdout_pieces(k)))
            entry = _write_shard(shard_paths(out, name)["file"], "train", layout.shard_count("train", k),
                                 (tokens[p.source][p.start:p.end] for p in layout.train_pieces(k)), bar.update)
            files.write_json(shard_paths(out, name)["done"], {"shard": entry, "holdout": holdout})
            removed += _release_units(work, layout.units_read_by(k))
            for u in [u for u in verified if layout.last[u] <= k]:  # no later shard reads them: unmap
                del verified[u]
    dt = time.monotonic() - start
    if not todo and len(shards) == layout.n_shards["train"]:  # a last step after the array: nothing to report
        return
    print(f"{label}: {len(todo)} train shard(s) written, {len(shards) - len(todo)} already done; {n_tokens:,} tokens "
          f"in {dt:.1f}s ({n_tokens / max(dt, 1e-9):,.0f} tok/s); {removed} unit token file(s) no longer needed "
          f"removed", file=sys.stderr)


def _open_unit(work: Work, u: int, shard: str) -> np.ndarray:
    """A unit's tokens, memory-mapped, once they match its done marker (count and sha256)."""
    paths = unit_paths(work.out, work.units[u].index)
    marker = work.markers[u]
    if not paths["tokens"].exists():
        raise FinalizeError(f"{paths['tokens']}: missing, but {shard} is not done and reads it (removed by hand?); "
                            f"delete {paths['done']} and rerun tokenize to redo the unit")
    tokens = open_shard(paths["tokens"])
    if len(tokens) != marker["tokens"] or hashlib.sha256(tokens.data).hexdigest() != marker["tokens_sha256"]:
        raise FinalizeError(f"{paths['tokens']}: does not match its done marker (damaged on disk?); delete "
                            f"{paths['done']} and rerun tokenize to redo the unit")
    return tokens


def _write_shard(path: Path, split: str, count: int, chunks, report=None) -> dict:
    """One shard of `count` tokens from the token arrays `chunks`, written atomically; returns its manifest entry."""
    header = make_header(count)
    digest = hashlib.sha256(header)
    docs = written = 0
    with files.atomic_file(path) as f:
        f.write(header)
        for arr in chunks:
            for i in range(0, len(arr), WRITE_CHUNK):
                piece = np.ascontiguousarray(arr[i: i + WRITE_CHUNK])
                f.write(piece.data)
                digest.update(piece.data)
                docs += int(np.count_nonzero(piece == tokenizer.EOT_TOKEN))
                written += len(piece)
                if report:
                    report(len(piece))
        if written != count:
            raise AssertionError(f"{path}: layout promised {count} tokens, the pieces held {written}")
    return {"name": path.name, "split": split, "tokens": count, "documents": docs, "sha256": digest.hexdigest(),
            "bytes": HEADER_BYTES + 2 * count, "edges_sha256": edges_sha256(path)[1]}


def _release_units(work: Work, units: range) -> int:
    """Remove the token files of those `units` whose every reader shard is done; returns how many went."""
    removed = 0
    for u in units:
        if all(work.shard_done(work.layout.shard_name("train", k)) for k in work.layout.readers(u)):
            path = unit_paths(work.out, work.units[u].index)["tokens"]
            if path.exists():
                path.unlink(missing_ok=True)  # two tasks finishing the unit's two shards may both get here
                removed += 1
    return removed


def complete(work: Work) -> int:
    """The last step (dataset lock held exclusively): validation shards, shards into place, manifest, no .work/."""
    out, layout = work.out, work.layout
    missing = work.missing_train_shards()
    if missing:
        raise FinalizeError(f"{out}: {len(missing)} of {layout.n_shards['train']} train shard(s) are not written "
                            f"yet (first: {layout.shard_name('train', missing[0])}); run the remaining finalize "
                            f"array tasks, or `python -m prep finalize --out {out}` without --task-index/--task-count")
    marks = [load_json(shard_paths(out, layout.shard_name("train", k))["done"], "shard done mark")
             for k in range(layout.n_shards["train"])]
    for j in range(layout.n_shards["val"]):
        name = layout.shard_name("val", j)
        if not work.shard_done(name):
            pieces = layout.val_pieces(j)
            entry = _write_shard(shard_paths(out, name)["file"], "val", layout.shard_count("val", j),
                                 (_open_holdout(out, p.source, marks[p.source]["holdout"])[p.start:p.end]
                                  for p in pieces))
            files.write_json(shard_paths(out, name)["done"], {"shard": entry, "holdout": None})
    entries = [m["shard"] for m in marks] + [
        load_json(shard_paths(out, layout.shard_name("val", j))["done"], "shard done mark")["shard"]
        for j in range(layout.n_shards["val"])]
    remove_stale_tmp(out)  # leftovers of killed finalizers; safe: no other prep process is here
    for entry in entries:
        _move_into_place(out, entry)
    files.fsync_dir(out)
    manifest = _manifest(work, entries)
    files.write_json(out / MANIFEST, manifest)
    clean_up(out)  # with the lock file in it (see prep.workdir)
    t, v = manifest["totals"]["train"], manifest["totals"]["val"]
    print(f"finalized {out}: train {t['tokens']:,} tokens / {t['documents']:,} docs in {t['shards']} shard(s), "
          f"val {v['tokens']:,} tokens / {v['documents']:,} docs in {v['shards']} shard(s)", file=sys.stderr)
    if not v["shards"]:
        print(f"{out} has no validation split (--val-tokens 0): train on it with eval.every: 0", file=sys.stderr)
    return 0


def clean_up(out: Path) -> None:
    """Remove .work/: what prep wrote there; anything else stays, and is named."""
    left = remove_work_dir(out)
    if left:
        print(f"warning: {work_dir(out)} is left in place: it holds {len(left)} file(s) prep did not write "
              f"({', '.join(left[:3])}{', ...' if len(left) > 3 else ''})", file=sys.stderr)


def _open_holdout(out: Path, k: int, expect: dict | None) -> np.ndarray:
    """Train shard k's holdout tokens, checked against its done mark (one at a time: 350BT has 3,500 of them)."""
    path = holdout_path(out, k)
    if expect is None or not path.exists():
        raise FinalizeError(f"{path}: missing, but {shard_paths(out, f'train_{k:06d}.bin')['done']} says it was "
                            f"written; delete that mark and rerun finalize")
    tokens = open_shard(path)
    if len(tokens) != expect["tokens"] or hashlib.sha256(path.read_bytes()).hexdigest() != expect["sha256"]:
        raise FinalizeError(f"{path}: does not match the done mark of train_{k:06d}.bin (damaged on disk?); delete "
                            f"{shard_paths(out, f'train_{k:06d}.bin')['done']} and rerun finalize")
    return tokens


def _move_into_place(out: Path, entry: dict) -> None:
    """A done shard from .work/shards/ to DS/ (a rename; a killed last step may have moved it already)."""
    src, dst = shard_paths(out, entry["name"])["file"], out / entry["name"]
    if src.exists():
        os.replace(src, dst)
    elif not (dst.exists() and dst.stat().st_size == entry["bytes"]):
        raise FinalizeError(f"{src}: missing, but {shard_paths(out, entry['name'])['done']} marks it done "
                            f"(removed by hand?); delete that mark and rerun finalize (if its units are gone too, "
                            f"delete {out} and tokenize again)")


def _manifest(work: Work, shards: list[dict]) -> dict:
    rcp = work.rcp
    stats = ReadStats()
    for m in work.markers:
        stats.add(ReadStats(m["stats"]["documents"], m["stats"]["empty_skipped"], m["stats"]["bad_skipped"],
                            m["stats"]["invalid_utf8_replaced"]))
    totals = {s: {"tokens": work.layout.totals[s], "documents": sum(x["documents"] for x in shards if x["split"] == s),
                  "shards": work.layout.n_shards[s]} for s in ("train", "val")}
    try:
        version = importlib.metadata.version("gpt2-pipeline")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "dataset_version": DATASET_VERSION,
        "format": {"name": "llm.c token shards", "version": 1, "magic": 20240520, "header_bytes": HEADER_BYTES,
                   "dtype": "uint16 little-endian", "sha256_of": "whole file (header + tokens)"},
        "tokenizer": dict(rcp["tokenizer"]),
        "source": source_of(rcp),
        "inputs": rcp["inputs"],
        "skipped_inputs": work.plan["skipped_inputs"],
        "validation": {"rule": rcp["validation"]["rule"], "seed": rcp["validation"]["seed"],
                       "requested_tokens": rcp["validation"]["tokens"], "tokens": totals["val"]["tokens"],
                       "documents": totals["val"]["documents"]},
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
