"""Which model a checkpoint holds, and which checkpoints rotation deleted: what eval results are keyed by.

A tag name comes back: a run restarted from scratch writes global_step3 again, a different model. A checkpoint's
identity is therefore its completion mark's content hash (the mark holds the step, every file's size and the time
it was written, so no two saves share it), recorded in every eval result beside the tag.

Rotation (checkpoints.rotate) appends one line per tag it deletes to RUN/checkpoints/rotated.jsonl, with that
identity, so that the eval watcher can say in results.jsonl which checkpoints were deleted before they were scored,
even when it runs after training (`submit.sh --local`). The file lives in checkpoints/ and goes with it: a run
restarted from scratch starts a new lineage, and the identities of the present tags plus those rotated away are
the checkpoints of the current run.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from common import files

from . import MARK, RunDir


def checkpoint_identity(tag_dir) -> dict | None:
    """{"tag", "step", "checkpoint_id", "checkpoint_written"} of a DeepSpeed tag with a completion mark, else None
    (an HF directory, a tag that is not complete)."""
    tag_dir = Path(tag_dir)
    try:
        raw = (tag_dir / MARK).read_bytes()
        mark = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(mark, dict):
        return None
    return {"tag": tag_dir.name, "step": mark.get("step"), "checkpoint_id": hashlib.sha256(raw).hexdigest()[:16],
            "checkpoint_written": mark.get("written")}


def rotation_log(run) -> Path:
    return RunDir(run).rotated


def _rotation_log_of(ckpt_dir: Path) -> Path:
    """The rotation log of a checkpoints directory, whatever it is called (tests rotate bare ones)."""
    return Path(ckpt_dir) / RunDir(ckpt_dir).rotated.name


def record_rotation(tag_dir, keep_last: int, keep_every: int) -> None:
    """Called by rotation just before it deletes tag_dir (rank 0)."""
    tag_dir = Path(tag_dir)
    identity = checkpoint_identity(tag_dir)
    if identity is None:
        return
    files.append_json_line(_rotation_log_of(tag_dir.parent), {
        **identity, "keep_last": keep_last, "keep_every": keep_every,
        "rotated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def rotated(run) -> list[dict]:
    """The lines of RUN/checkpoints/rotated.jsonl, oldest first; none when no tag was ever rotated away."""
    path = rotation_log(run)
    if not path.exists():
        return []
    return [r for _, r in files.read_json_lines(path) if isinstance(r, dict) and "checkpoint_id" in r]


def current_identities(run) -> set[str]:
    """checkpoint_id of every checkpoint of the current run: complete tags present, and those rotated away."""
    from .checkpoints import complete_tags
    present = (checkpoint_identity(tag) for tag in complete_tags(RunDir(run).checkpoints))
    return {i["checkpoint_id"] for i in present if i} | {r["checkpoint_id"] for r in rotated(run)}
