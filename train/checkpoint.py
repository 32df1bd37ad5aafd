"""DeepSpeed checkpoints in RUN/checkpoints: save, find the newest complete one, rotate, convert to universal.

Layout (DeepSpeed's own): RUN/checkpoints/global_stepN/ holds the tag's files; RUN/checkpoints/latest names the newest
tag and is written by DeepSpeed only after every rank has finished writing it, so a tag is complete once `latest`
names it or a later step. client_state (contract C3) rides in the tag's mp_rank_00 model-states file.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from common.errors import PipelineError

TAG_RE = re.compile(r"^global_step(\d+)$")
UNIVERSAL_SUFFIX = "_universal"


class CheckpointError(PipelineError):
    pass


def tag_for(step: int) -> str:
    return f"global_step{step}"


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise CheckpointError(f"{latest} names {tag!r} but {Path(ckpt_dir) / tag} does not exist")
    return tag


def complete_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the complete tags (at or before the one `latest` names), oldest first."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return []
    newest = int(TAG_RE.match(tag).group(1))
    steps = []
    for path in Path(ckpt_dir).iterdir():
        m = TAG_RE.match(path.name)
        if m and path.is_dir() and int(m.group(1)) <= newest:
            steps.append(int(m.group(1)))
    return sorted(steps)


def read_client_state(tag_dir: Path) -> dict:
    """The client_state of a tag without building an engine (memory-mapped, so cheap even for big models)."""
    files = sorted(Path(tag_dir).glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir}: no mp_rank_00 model-states file; not a DeepSpeed checkpoint tag")
    state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    missing = [k for k in ("model_config", "step", "loader") if k not in state]
    if missing:
        raise CheckpointError(f"{files[0]}: no {', '.join(missing)} in client_state; not written by this trainer")
    return {k: state[k] for k in ("model_config", "config", "step", "tokens_seen", "loader", "rng", "world_size")
            if k in state}


def rotate(ckpt_dir: Path, keep_last: int, keep_every: int) -> list[int]:
    """Delete complete tags that are neither among the newest keep_last nor a multiple of keep_every; rank 0 only."""
    steps = complete_steps(ckpt_dir)
    keep = set(steps[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    removed = []
    for step in steps:
        if step not in keep:
            for suffix in ("", UNIVERSAL_SUFFIX):
                shutil.rmtree(Path(ckpt_dir) / f"{tag_for(step)}{suffix}", ignore_errors=True)
            removed.append(step)
    return removed


def to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert a tag with DeepSpeed's ds_to_universal (once; the result is renamed into place atomically)."""
    out_tag = tag + UNIVERSAL_SUFFIX
    out = Path(ckpt_dir) / out_tag
    if out.is_dir():
        return out_tag
    tmp = Path(ckpt_dir) / f".{out_tag}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(Path(ckpt_dir) / tag),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CheckpointError(f"ds_to_universal failed on {Path(ckpt_dir) / tag}: {last}")
    # The converter also writes RUN/checkpoints/latest_universal naming its output; we load by explicit tag.
    (Path(ckpt_dir) / "latest_universal").unlink(missing_ok=True)
    os.replace(tmp, out)
    return out_tag
