"""`eval checkpoint` and `eval export`: score one checkpoint with lm-eval, or write it as an HF directory."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from common import files
from train.rundir import run_dir_of
from train.rundir.identity import checkpoint_identity

from .harness import EvalError, lm_eval_version, load_tasks, run_tasks, summarize


def load_checkpoint(path):
    """train.rundir.consolidate.load_model with its errors turned into ours."""
    from model.config import ConfigError
    from train.rundir.checkpoints import CheckpointError
    from train.rundir.consolidate import load_model
    try:
        return load_model(path)
    except (CheckpointError, ConfigError, FileNotFoundError) as exc:
        raise EvalError(f"cannot load checkpoint {path}: {exc}") from None


def default_output(ckpt: Path, tag: str) -> Path:
    """RUN/eval/<tag>.json inside a run; beside an HF directory otherwise."""
    run = run_dir_of(ckpt)
    if run is not None:
        return run.eval_result(tag)
    ckpt = Path(ckpt).resolve()
    return ckpt.parent / f"{ckpt.name}.eval.json"


def write_result(path: Path, record: dict) -> None:
    """RUN/eval/<tag>.json (or --out): atomic, with the permissions the umask gives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, record, indent=2)


def evaluate_checkpoint(ckpt, tasks=("hellaswag",), hellaswag_file=None, limit=None, batch_size=32,
                        device=None, dtype="auto") -> dict:
    """Load, score and describe one checkpoint; inputs are all checked before the model is run."""
    return Scorer(tasks, hellaswag_file, limit, batch_size, device, dtype).score(ckpt)


class Scorer:
    """Scores checkpoints one after another in this process, with the tasks loaded once for all of them.

    A process per checkpoint pays the imports and the task loading (lm-eval's task objects, the HellaSwag
    documents) again each time, which on a small model or a short --limit is most of an evaluation. Each
    record's `timings` splits its wall time into tasks (0 after the first checkpoint), model and score seconds.
    """

    def __init__(self, tasks=("hellaswag",), hellaswag_file=None, limit=None, batch_size=32, device=None,
                 dtype="auto"):
        start = time.perf_counter()
        self.tasks = load_tasks(list(tasks), hellaswag_file)
        self.tasks_s = time.perf_counter() - start  # charged to the first checkpoint scored
        self.limit, self.batch_size, self.device, self.dtype = limit, batch_size, device, dtype

    def score(self, ckpt) -> dict:
        from .lm import PipelineLM
        begin = time.perf_counter()
        model, meta = load_checkpoint(ckpt)
        lm = PipelineLM(model=model, batch_size=self.batch_size, device=self.device, dtype=self.dtype)
        loaded = time.perf_counter()
        raw = run_tasks(lm, self.tasks, limit=self.limit)
        end = time.perf_counter()
        tasks_s, self.tasks_s = self.tasks_s, 0.0
        return {
            "checkpoint": str(Path(ckpt).resolve()),
            "tag": meta.get("tag") or Path(ckpt).resolve().name,
            # What was scored, not just its name: results are keyed by it (eval.results).
            **{k: v for k, v in (checkpoint_identity(meta["path"]) or {}).items() if k.startswith("checkpoint_")},
            "kind": meta.get("kind"),
            "step": meta.get("step"),
            "tokens_seen": meta.get("tokens_seen"),
            "lm_eval_version": lm_eval_version(),
            "tasks": summarize(raw, self.tasks),
            "limit": self.limit,
            "batch_size": self.batch_size,
            "device": str(lm.device),
            "dtype": lm.dtype,  # bf16: the transformer under bf16 autocast, the LM head in fp32
            "num_params": model.num_params(),
            "wall_time_s": round(end - begin + tasks_s, 3),
            "timings": {"tasks_s": round(tasks_s, 3), "model_s": round(loaded - begin, 3),
                        "score_s": round(end - loaded, 3)},
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def export_checkpoint(ckpt, out, force: bool = False) -> dict:
    """Write a checkpoint as an HF directory at `out`: a new path, an empty directory, or (force) an earlier
    export; anything else is refused before the checkpoint is even read."""
    from model.hf import export_target, save_hf

    from .results import check_export_out
    check_export_out(Path(out))
    export_target(out, force)
    model, meta = load_checkpoint(ckpt)
    save_hf(model, out, force=force, source={k: meta.get(k) for k in ("kind", "path", "tag", "step", "tokens_seen")})
    return meta
