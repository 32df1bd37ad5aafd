"""`prep eval-data`: HellaSwag validation (Rowan/hellaswag) as one local jsonl that eval/ reads on offline nodes.

The file keeps the original schema (activity_label, ctx_a, ctx_b, ctx, endings, label, ...), one example a line.
--from installs a copy brought in by hand, after checking every line has that schema.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from common.errors import PipelineError

from . import atomic
from .download import DownloadError, check_online

REPO_ID = "Rowan/hellaswag"
FILENAME = "hellaswag_val.jsonl"
REQUIRED = ("activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label")


class EvalDataError(PipelineError):
    pass


def check_example(obj, where: str) -> None:
    if not isinstance(obj, dict):
        raise EvalDataError(f"{where}: expected a JSON object")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise EvalDataError(f"{where}: missing field(s) {', '.join(missing)} (HellaSwag schema: {', '.join(REQUIRED)})")
    if not (isinstance(obj["endings"], list) and len(obj["endings"]) == 4):
        raise EvalDataError(f"{where}: 'endings' must be a list of 4 strings")
    if str(obj["label"]) not in ("0", "1", "2", "3"):
        raise EvalDataError(f"{where}: 'label' must be 0-3, got {obj['label']!r}")


def install_local(src: Path, dest: Path) -> int:
    n = 0
    with open(src, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{src}:{lineno}: malformed JSON ({exc.msg})") from None
            check_example(obj, f"{src}:{lineno}")
            n += 1
    if n == 0:
        raise EvalDataError(f"{src}: no examples")
    with atomic.atomic_file(dest) as out, open(src, "rb") as f:
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
    with atomic.atomic_file(dest, "w") as out:
        for i, row in enumerate(rows):
            check_example(row, f"{REPO_ID} validation row {i}")
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def eval_data(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dest = out / FILENAME
    if args.from_file:
        n = install_local(Path(args.from_file), dest)
        print(f"installed {n:,} HellaSwag validation examples from {args.from_file} as {dest}", file=sys.stderr)
    else:
        n = download_validation(dest)
        print(f"wrote {n:,} HellaSwag validation examples from {REPO_ID} to {dest}", file=sys.stderr)
    print(dest)
    return 0
