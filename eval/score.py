"""`eval checkpoint` and `eval export`: score one checkpoint with lm-eval, or write it as an HF directory."""
from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .harness import EvalError, lm_eval_version, load_tasks, run_tasks, summarize


def load_checkpoint(path):
    """model.checkpoint.load_model with its errors turned into ours."""
    from model.checkpoint import CheckpointError, load_model
    from model.config import ConfigError
    try:
        return load_model(path)
    except (CheckpointError, ConfigError, FileNotFoundError) as exc:
        raise EvalError(f"cannot load checkpoint {path}: {exc}") from None


def run_dir_of(path: Path) -> Path | None:
    """The run directory a checkpoint path lies in (a run dir, its checkpoints dir, or a tag dir), else None."""
    path = Path(path).resolve()
    if (path / "checkpoints").is_dir():
        return path
    if path.name == "checkpoints":
        return path.parent
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return None


def default_output(ckpt: Path, tag: str) -> Path:
    """RUN/eval/<tag>.json inside a run; beside an HF directory otherwise."""
    run = run_dir_of(ckpt)
    if run is not None:
        return run / "eval" / f"{tag}.json"
    ckpt = Path(ckpt).resolve()
    return ckpt.parent / f"{ckpt.name}.eval.json"


def write_json_atomic(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluate_checkpoint(ckpt, tasks=("hellaswag",), hellaswag_file=None, limit=None, batch_size=32,
                        device=None) -> dict:
    """Load, score and describe one checkpoint; inputs are all checked before the model is run."""
    import torch

    from .lm import PipelineLM
    start = time.time()
    task_objects = load_tasks(list(tasks), hellaswag_file)
    model, meta = load_checkpoint(ckpt)
    lm = PipelineLM(model=model, batch_size=batch_size, device=device)
    raw = run_tasks(lm, task_objects, limit=limit)
    return {
        "checkpoint": str(Path(ckpt).resolve()),
        "tag": meta.get("tag") or Path(ckpt).resolve().name,
        "kind": meta.get("kind"),
        "step": meta.get("step"),
        "tokens_seen": meta.get("tokens_seen"),
        "lm_eval_version": lm_eval_version(),
        "tasks": summarize(raw, task_objects),
        "limit": limit,
        "batch_size": batch_size,
        "device": str(lm.device),
        "dtype": "bfloat16 autocast" if lm.autocast_dtype == torch.bfloat16 else "float32",
        "num_params": model.num_params(),
        "wall_time_s": round(time.time() - start, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def export_checkpoint(ckpt, out) -> dict:
    model, meta = load_checkpoint(ckpt)
    model.save_hf(out)
    return meta
