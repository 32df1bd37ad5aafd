"""The dataset recipe: everything that decides a dataset's bytes (a training recipe is train/recipe.py's).
Stored in .work/ while tokenizing and in the manifest after.

A rerun with the same recipe reuses the work; a different one is refused with the differences named, because
mixing units tokenized under two recipes would silently produce a dataset that matches neither.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from common import cli, files, tokenizer
from common.errors import PipelineError

from . import UsageError
from .inputs import HASHED_EDGE_BYTES, InputError, auto_unit_bytes, discover, file_fingerprint, plan_units
from .reader import DATASET_VERSION, check_version
from .workdir import check_task_flags, load_json, work_dir

# The shard header stores the token count as an int32.
MAX_SHARD_TOKENS = 2**31 - 1
# The seed keys blake2b as its decimal text, and a blake2b key is at most 64 bytes; 2^63 - 1 is far inside that.
MAX_VAL_SEED = 2**63 - 1
VAL_RULE = ("validation = the documents with the smallest blake2b-64 hash (keyed by the seed) of their id, "
            "or of their text when they have no id, taken in hash order until their tokens (EOT included) reach "
            "validation.tokens; written in input order. All other documents are train.")


class RecipeMismatch(PipelineError):
    pass


def build(args) -> tuple[dict, list, list]:
    """(recipe, units, skipped input files) for a tokenize command line."""
    if args.shard_tokens <= 0:
        raise UsageError(f"--shard-tokens must be positive, got {args.shard_tokens}")
    if args.shard_tokens > MAX_SHARD_TOKENS:
        raise UsageError(f"--shard-tokens {args.shard_tokens:,} does not fit the shard header, whose token count is "
                         f"an int32: at most {MAX_SHARD_TOKENS:,} (llm.c's own loader reads shards of up to about "
                         f"1.07e9 tokens; the default is 100,000,000)")
    if args.val_tokens < 0:
        raise UsageError(f"--val-tokens must be >= 0, got {args.val_tokens}")
    if not -MAX_VAL_SEED <= args.val_seed <= MAX_VAL_SEED:
        raise UsageError(f"--val-seed must be from {-MAX_VAL_SEED:,} to {MAX_VAL_SEED:,}, got "
                         f"{str(args.val_seed)[:30]}{'...' if len(str(args.val_seed)) > 30 else ''}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    check_task_flags(args.task_index, args.task_count)
    files = discover(args.input)
    skipped: list[dict] = []
    if args.unit_bytes < 0:
        raise UsageError(f"--unit-bytes must be >= 0 (0 = auto), got {args.unit_bytes}")
    unit_bytes = args.unit_bytes or auto_unit_bytes(files)
    units = plan_units(files, args.text_column, unit_bytes, args.skip_bad_docs, skipped)
    if not units:
        raise InputError("nothing to tokenize: every input file was skipped (" +
                         "; ".join(f"{s['path']}: {s['reason']}" for s in skipped) + ")")
    rcp = {
        "format_version": DATASET_VERSION,
        "inputs": [file_fingerprint(f) for f in files],
        "text_column": args.text_column,
        "skip_bad_docs": bool(args.skip_bad_docs),
        "tokenizer": {"name": tokenizer.ENCODING_NAME, "n_vocab": tokenizer.N_VOCAB, "eot": tokenizer.EOT_TOKEN,
                      "eot_placement": "prepend"},
        "shard_tokens": args.shard_tokens,
        "validation": {"tokens": args.val_tokens, "seed": args.val_seed, "rule": VAL_RULE},
        "unit_bytes": unit_bytes,
    }
    return rcp, units, skipped


def differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two recipes (old = the one already on disk)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "inputs" and isinstance(a, list) and isinstance(b, list):
            out += input_differences(a, b)
        elif isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in differences(a, b)]
        else:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def input_differences(old: list[dict], new: list[dict]) -> list[str]:
    """How two input lists differ: files added or removed, content changed, order."""
    old_files, new_files = {f["path"]: f for f in old}, {f["path"]: f for f in new}
    out = [f"input added: {p}" for p in new_files.keys() - old_files.keys()]
    out += [f"input removed: {p}" for p in old_files.keys() - new_files.keys()]
    for p in sorted(old_files.keys() & new_files.keys()):
        a, b = old_files[p], new_files[p]
        if a["bytes"] != b["bytes"]:
            out.append(f"input changed size: {p} ({a['bytes']} -> {b['bytes']} bytes)")
            continue
        # A new modification time alone (a copy without -p, a restore, an HSM recall) is not a change: the
        # content is judged by size and the hash of both ends.
        if a["edges_sha256"] != b["edges_sha256"]:
            when = (f"modified {_clock(a['mtime_ns'])} -> {_clock(b['mtime_ns'])}" if a["mtime_ns"] != b["mtime_ns"]
                    else "same modification time")
            out.append(f"input changed: {p} (same size, {when}, the hash of its first and last "
                       f"{HASHED_EDGE_BYTES >> 10} KiB differs)")
    if not out and [f["path"] for f in old] != [f["path"] for f in new]:
        out.append("inputs in a different order")
    return out


def _clock(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def refuse_if_different(existing: dict, rcp: dict, what: str, out: Path) -> None:
    diffs = differences(existing, rcp)
    if diffs:
        raise RecipeMismatch(f"{out} holds {what} made with a different recipe: {'; '.join(diffs)} "
                             f"(use another --out, or delete {out} to start over)")


def claim_work_dir(out: Path, rcp: dict, units: list, skipped: list) -> None:
    """Record recipe and unit plan under .work/ (every array task writes the same), or check they agree."""
    (work_dir(out) / "units").mkdir(parents=True, exist_ok=True)
    plan = {"units": [u.to_dict() for u in units], "skipped_inputs": skipped}
    for name, obj in (("recipe.json", rcp), ("plan.json", plan)):
        path = work_dir(out) / name
        if path.exists():
            existing = load_json(path, "recipe" if name == "recipe.json" else "unit plan")
            if name == "recipe.json":
                check_version(existing.get("format_version"), path)
                refuse_if_different(existing, obj, "unfinished work (.work/)", out)
            elif existing != obj:
                raise RecipeMismatch(f"{path}: the inputs' row-group layout changed since tokenizing started "
                                     f"(delete {out / '.work'} to start over)")
        else:
            files.write_json(path, obj)


def print_config(out: Path, rcp: dict, units: list, workers: int, task_index: int, task_count: int,
                 n_done: int) -> None:
    total_bytes = sum(f["bytes"] for f in rcp["inputs"])
    rows = [
        ("output", str(out)),
        ("inputs", f"{len(rcp['inputs'])} file(s), {total_bytes / 1e6:,.1f} MB, {len(units)} unit(s)"),
        ("text column", rcp["text_column"]),
        ("tokenizer", f"{rcp['tokenizer']['name']} (EOT {rcp['tokenizer']['eot']} prepended to each document)"),
        ("shard tokens", f"{rcp['shard_tokens']:,}"),
        ("val tokens", f"{rcp['validation']['tokens']:,} (seed {rcp['validation']['seed']})"),
        ("skip bad docs", str(rcp["skip_bad_docs"])),
        ("workers", str(workers)),
        ("task", f"{task_index} of {task_count} ({sum(1 for u in units if u.index % task_count == task_index)} "
                 f"unit(s), {n_done} already done)"),
    ]
    print(cli.table(rows), file=sys.stderr)
