"""What rank 0 prints when a run finishes: what this session of training did, where its result is, what to run next.

The numbers come from RUN/metrics.jsonl (its last line per step, as every reader takes them) over the steps this
process trained, and from the wall time the caller measured; the commands name the run directory as given.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from common import cli, files

from .rundir import RunDir
from .rundir.checkpoints import newest_complete


def _records(run_dir: Path, after_step: int) -> tuple[dict, dict]:
    """(training lines, validation lines) of metrics.jsonl by step, the last line per step, for steps > after_step."""
    train, val = {}, {}
    path = RunDir(run_dir).metrics
    for _, record in files.read_json_lines(path) if path.exists() else []:
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= after_step:
            continue
        if "loss" in record and "skipped" not in record:
            train[record["step"]] = record
        elif "val_loss" in record:
            val[record["step"]] = record
    return train, val


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def text(run_dir, start_step: int, end_step: int, tokens: int, seconds: float, world_size: int, on_gpu: bool) -> str:
    """The summary block: this session's steps start_step+1..end_step, `tokens` trained in `seconds` of wall time."""
    run_dir = Path(run_dir)
    train, val = _records(run_dir, start_step)
    rows = [("steps", f"{start_step + 1}..{end_step}" if end_step > start_step else "none this session"),
            ("tokens", f"{tokens:,}"), ("time", _duration(seconds)),
            ("tokens/s", f"{tokens / seconds:,.0f} (wall time, start-up, eval and checkpoints included)"
             if seconds > 0 else "n/a")]
    if train:
        rows.insert(0, ("final loss", f"{train[max(train)]['loss']:.4f} (step {max(train)})"))
    if val:
        rows.insert(1, ("final val loss", f"{val[max(val)]['val_loss']:.4f} (step {max(val)})"))
    mfus = [r["mfu"] for r in train.values() if isinstance(r.get("mfu"), (int, float))]
    if mfus:
        rows.append(("mean MFU", f"{100 * sum(mfus) / len(mfus):.1f}% over {len(mfus)} logged updates"))
    if on_gpu:
        rows.append(("GPU-hours", f"{world_size * seconds / 3600:.2f} ({world_size} GPU(s))"))
    newest = newest_complete(RunDir(run_dir).checkpoints)
    rows.append(("last checkpoint", str(newest) if newest is not None else "none"))
    run = shlex.quote(str(run_dir))
    tb = RunDir(run_dir).tensorboard
    lines = ["", f"training finished: {run_dir}", cli.table(rows, indent="  "), "next:",
             *([f"  tensorboard --logdir {shlex.quote(str(tb))}"] if tb.is_dir() else []),
             f"  python -m model sample {run} --prompt 'Hello, I am'",
             f"  python -m eval export {run} --out {shlex.quote(str(run_dir.parent / (run_dir.name + '-hf')))}"]
    return "\n".join(lines)


def of(trainer, seconds: float) -> str:
    """text() for a train.trainer.Trainer whose run() has returned, `seconds` after it was called."""
    start = trainer.resume_state or {}
    return text(trainer.run_dir, int(start.get("step", 0)), trainer.step,
                trainer.tokens_seen - int(start.get("tokens_seen", 0)), seconds, trainer.place.world_size,
                trainer.place.device.startswith("cuda"))
