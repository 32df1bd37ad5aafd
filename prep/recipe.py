"""The recipe: everything that decides a dataset's bytes. Stored in .work/ while tokenizing and in the manifest after.

A rerun with the same recipe reuses the work; a different one is refused with the differences named, because
mixing units tokenized under two recipes would silently produce a dataset that matches neither.
"""
from __future__ import annotations

import sys
from pathlib import Path

from common import tokenizer
from common.errors import PipelineError

from . import UsageError, atomic
from .inputs import InputError, auto_unit_bytes, discover, file_fingerprint, plan_units

FORMAT_VERSION = 1
VAL_RULE = ("validation = the documents with the smallest blake2b-64 hash (keyed by the seed) of their id, "
            "or of their text when they have no id, taken in hash order until their tokens (EOT included) reach "
            "validation.tokens; written in input order. All other documents are train.")


class RecipeMismatch(PipelineError):
    pass


def build(args) -> tuple[dict, list, list]:
    """(recipe, units, skipped input files) for a tokenize command line."""
    if args.shard_tokens <= 0:
        raise UsageError(f"--shard-tokens must be positive, got {args.shard_tokens}")
    if args.val_tokens < 0:
        raise UsageError(f"--val-tokens must be >= 0, got {args.val_tokens}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if (args.task_index is None) != (args.task_count is None):
        raise UsageError("--task-index and --task-count go together")
    if args.task_count is not None and not 0 <= args.task_index < args.task_count:
        raise UsageError(f"--task-index {args.task_index} is outside 0..{args.task_count - 1}")
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
        "format_version": FORMAT_VERSION,
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
            old_files, new_files = {f["path"]: f["bytes"] for f in a}, {f["path"]: f["bytes"] for f in b}
            for p in new_files.keys() - old_files.keys():
                out.append(f"input added: {p}")
            for p in old_files.keys() - new_files.keys():
                out.append(f"input removed: {p}")
            for p in old_files.keys() & new_files.keys():
                if old_files[p] != new_files[p]:
                    out.append(f"input changed size: {p} ({old_files[p]} -> {new_files[p]} bytes)")
            if not out:
                out.append("inputs in a different order")
        elif isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in differences(a, b)]
        else:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def refuse_if_different(existing: dict, rcp: dict, what: str, out: Path) -> None:
    diffs = differences(existing, rcp)
    if diffs:
        raise RecipeMismatch(f"{out} holds {what} made with a different recipe: {'; '.join(diffs)} "
                             f"(use another --out, or delete {out} to start over)")


def claim_work_dir(out: Path, rcp: dict, units: list, skipped: list) -> None:
    """Record recipe and unit plan under .work/ (every array task writes the same), or check they agree."""
    units_dir = out / ".work" / "units"
    units_dir.mkdir(parents=True, exist_ok=True)
    plan = {"units": [u.to_dict() for u in units], "skipped_inputs": skipped}
    for name, obj in (("recipe.json", rcp), ("plan.json", plan)):
        path = out / ".work" / name
        if path.exists():
            existing = atomic.read_json(path)
            if name == "recipe.json":
                refuse_if_different(existing, obj, "unfinished work (.work/)", out)
            elif existing != obj:
                raise RecipeMismatch(f"{path}: the inputs' row-group layout changed since tokenizing started "
                                     f"(delete {out / '.work'} to start over)")
        else:
            atomic.write_json(path, obj)


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
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), file=sys.stderr)
