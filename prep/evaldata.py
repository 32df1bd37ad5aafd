"""`prep eval-data`: HellaSwag validation (Rowan/hellaswag) as one local jsonl that eval/ reads on offline nodes.

The file keeps the original schema (activity_label, ctx_a, ctx_b, ctx, endings, label, ...), one example a line.
--from installs a copy brought in by hand, after checking every line (common.hellaswag, the check eval runs).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from common import files, hellaswag

from .download import DownloadError, check_online

REPO_ID = "Rowan/hellaswag"
FILENAME = "hellaswag_val.jsonl"


def install_local(src: Path, dest: Path) -> int:
    n = hellaswag.check_file(src)  # every line, before anything is written (the directory included)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(dest) as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out)
    return n


def download_validation(dest: Path) -> int:
    check_online(f"copy a HellaSwag validation jsonl (e.g. rowanz/hellaswag's data/hellaswag_val.jsonl) here and "
                 f"run `python -m prep eval-data --out {dest.parent} --from FILE`")
    import datasets
    try:
        rows = datasets.load_dataset(REPO_ID, split="validation")
    except Exception as exc:  # datasets raises many kinds (connection, missing config, ...)
        raise DownloadError(f"loading {REPO_ID} validation: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    n = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(dest, "w") as out:
        for i, row in enumerate(rows):
            hellaswag.check_doc(row, f"{REPO_ID} validation row {i}")
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def eval_data(args) -> int:
    out = Path(args.out).resolve()
    dest = out / FILENAME
    if args.from_file:
        n = install_local(Path(args.from_file), dest)
        print(f"installed {n:,} HellaSwag validation examples from {args.from_file} as {dest}", file=sys.stderr)
    else:
        n = download_validation(dest)
        print(f"wrote {n:,} HellaSwag validation examples from {REPO_ID} to {dest}", file=sys.stderr)
    print(dest)
    return 0
