"""What was evaluated, and what was not: eval results keyed by checkpoint identity, and the places eval may write.

Every result of a run's checkpoint carries the checkpoint's identity (train.rundir.identity: the tag and its
completion mark's hash), so a tag that comes back in a run restarted from scratch is scored again, and the report
tells the current run's scores from those of an earlier run in the same directory. A checkpoint rotation deleted
before anyone scored it gets a line in results.jsonl too, with "unscored" saying why: nothing is lost silently.
"""
from __future__ import annotations

import json
from pathlib import Path

from common import files
from common.errors import PipelineError
from train.rundir import MARK, SAVING, RunDir
from train.rundir.identity import checkpoint_identity, current_identities, rotated

from .harness import EvalError

# The largest file `eval checkpoint --out` reads to tell whether it is an earlier result of ours.
MAX_RESULT_BYTES = 16 << 20


def read_records(path: Path, check=None) -> list[dict]:
    """The records of an append-only JSON-lines file of the run (results.jsonl, metrics.jsonl); none while it does
    not exist yet. check(record), when given, says what in a record cannot be read (or None): such a line is an
    EvalError naming file:line."""
    if not path.exists():
        return []
    records = []
    for lineno, record in files.read_json_lines(path, EvalError):
        if not isinstance(record, dict):
            continue
        why = check(record) if check else None
        if why:
            raise EvalError(f"{path}:{lineno}: {why}; correct or remove that line")
        records.append(record)
    return records


def is_whole(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def is_number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def unreadable_field(record: dict) -> str | None:
    """What in a result record `eval report` cannot read (a field of the wrong type), or None. The files are the
    user's to edit, and a line of valid JSON with a string for a number was a traceback in the report."""
    for name in ("step", "tokens_seen"):
        if not is_whole(record.get(name)):
            return f"{name} {record[name]!r} is not a whole number"
    tasks = record.get("tasks", {})
    if not isinstance(tasks, dict):
        return f"tasks {tasks!r} is not an object"
    for task, metrics in tasks.items():
        if not isinstance(metrics, dict):
            return f"tasks.{task} {metrics!r} is not an object"
        for name in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            if not is_number(metrics.get(name)):
                return f"tasks.{task}.{name} {metrics[name]!r} is not a number"
        if not is_whole(metrics.get("n_docs")):
            return f"tasks.{task}.n_docs {metrics['n_docs']!r} is not a whole number"
    return None


def key(record: dict) -> tuple:
    return record.get("tag"), record.get("checkpoint_id")


def scored_keys(run) -> set[tuple]:
    """(tag, checkpoint_id) of every scored checkpoint in results.jsonl."""
    return {key(r) for r in read_records(RunDir(run).results) if "unscored" not in r}


def settled_keys(run) -> set[tuple]:
    """Scored, or recorded as never scored."""
    return {key(r) for r in read_records(RunDir(run).results)}


def key_of(tag_dir) -> tuple:
    identity = checkpoint_identity(tag_dir) or {}
    return Path(tag_dir).name, identity.get("checkpoint_id")


def result_of(run, wanted: tuple) -> Path | None:
    """RUN/eval/<tag>.json when it is the result of the checkpoint with key `wanted` (key_of), not of an earlier
    checkpoint of the same name."""
    path = RunDir(run).eval_result(wanted[0])
    try:
        record = files.read_json(path, EvalError)
    except (FileNotFoundError, EvalError):
        return None
    return path if isinstance(record, dict) and key(record) == wanted else None


def record_unscored(run, entries: list[tuple[dict, str]]) -> list[tuple]:
    """A results.jsonl line for each (identity, why) of a checkpoint left without a score, identity being
    train.rundir.identity's record of it. Returns the keys recorded now; under a lock, so watchers and eval jobs
    doing this at once write each line once, and a checkpoint already recorded (scored or not) gets no second."""
    run = RunDir(run)
    run.watch.mkdir(parents=True, exist_ok=True)
    recorded = []
    with files.lock(run.watch / "results.lock", f"the results of {run.path}", wait=True):
        settled = settled_keys(run.path)
        for identity, reason in entries:
            if key(identity) in settled:
                continue
            files.append_json_line(run.results, {
                "tag": identity["tag"], "step": identity.get("step"), "checkpoint_id": identity["checkpoint_id"],
                "checkpoint_written": identity.get("checkpoint_written"), "unscored": reason})
            settled.add(key(identity))
            recorded.append(key(identity))
    return recorded


def record_rotated_unscored(run, log=print) -> list[str]:
    """A results.jsonl line for each checkpoint rotated away with no result: its identity and why. Returns the
    tags recorded now."""
    run = RunDir(run)
    reasons = {}
    for r in rotated(run.path):
        reasons[key(r)] = (r, f"rotated away by checkpoint.keep_last={r.get('keep_last')} "
                              + (f"(keep_every={r['keep_every']}) " if r.get("keep_every") else "")
                              + f"at {r.get('rotated_at')}, before it was scored")
    if not reasons:
        return []
    recorded = record_unscored(run.path, list(reasons.values()))
    for k in recorded:
        log(f"eval watch: {k[0]}: {reasons[k][1]}; recorded in {run.results}")
    return [k[0] for k in recorded]


def record_given_up(run, tag_dir, reason: str) -> bool:
    """A results.jsonl line for the checkpoint at tag_dir that every allowed evaluation attempt failed on: it is not
    lost silently, and `eval report` lists it with the reason. False when it has no identity (no completion mark)
    or a line already."""
    identity = checkpoint_identity(tag_dir)
    return identity is not None and bool(record_unscored(run, [(identity, reason)]))


def run_records(run) -> tuple[list[dict], list[dict], list[dict]]:
    """(scored, unscored, earlier) records of the run: results.jsonl together with each RUN/eval/<tag>.json that
    `eval checkpoint` wrote and no watcher appended; earlier: scored checkpoints that are not of the current run
    (a run restarted from scratch in this directory, or a checkpoint deleted by hand)."""
    layout = RunDir(run)
    records = read_records(layout.results, check=unreadable_field)
    seen = {key(r) for r in records}
    for path in sorted(layout.eval.glob("global_step*.json")) if layout.eval.is_dir() else []:
        try:
            record = files.read_json(path, EvalError)
        except (OSError, EvalError):
            continue
        if isinstance(record, dict) and "tasks" in record and key(record) not in seen \
                and not unreadable_field(record):  # like one that is not JSON: not a result of ours
            records.append(record)
            seen.add(key(record))
    current = current_identities(layout.path)
    done = {key(r) for r in records if "unscored" not in r}
    scored, unscored, earlier = [], [], []
    for r in records:
        if "unscored" in r:
            # An earlier run's is left out; one rotated away while it was being scored has its result after all.
            if r.get("checkpoint_id") in current and key(r) not in done:
                unscored.append(r)
        elif r.get("checkpoint_id") in current:
            scored.append(r)
        else:
            earlier.append(r)
    return scored, unscored, earlier


def current_segment(lines: list[dict]) -> list[dict]:
    """The metrics.jsonl lines of the current run: from the last fresh start (a training line of step 1) on.

    A resume logs again from its checkpoint's step + 1 (> 1), so only a start without a checkpoint, a new run in
    this directory, logs step 1 a second time.
    """
    start = 0
    for i, m in enumerate(lines):
        if m.get("step") == 1 and "loss" in m:
            start = i
    return lines[start:]


def is_our_result(path: Path) -> bool:
    """An earlier `eval checkpoint` result: a JSON object with the fields it writes."""
    try:
        if path.stat().st_size > MAX_RESULT_BYTES:
            return False
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"tag", "tasks", "lm_eval_version"} <= record.keys()


def protected_place(path: Path) -> str | None:
    """What `path` lies inside that no eval output may land in: a run's checkpoints/, a checkpoint tag, a
    dataset; None when it is none of them."""
    from prep.reader import MANIFEST
    path = Path(path).resolve()
    for place in (path, *path.parents):
        if place == RunDir(place.parent).checkpoints and RunDir(place.parent).looks_like_run():
            return f"the checkpoints of run {place.parent}"
        if place.is_dir() and ((place / MARK).exists() or (place / SAVING).exists()
                               or any(place.glob("*model_states.pt"))):
            return f"checkpoint {place}"
        if (place / MANIFEST).is_file() or (place / ".work" / "recipe.json").is_file():
            return f"dataset {place}"
    return None


def check_out_parent(out: Path) -> None:
    """Refused before the work, not when its result is written: --out under a file that is not a directory, or
    in a directory this process cannot write in (a read-only mount, no permission, a full disk)."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise EvalError(f"--out {out}: {parent} is not a directory; choose another --out")
    # Where directories are missing, in the one that must take the first of them.
    try:
        files.probe_write(parent)
    except OSError as exc:
        raise EvalError(f"--out {out}: cannot write in {parent} ({exc.strerror or exc}); make it writable or "
                        f"choose another --out") from None


def check_export_out(out: Path) -> None:
    where = protected_place(out)
    if where:
        raise EvalError(f"--out {out} lies inside {where}; an export goes elsewhere (it would be taken for, or "
                        f"deleted with, what is there): choose another --out")
    check_out_parent(out)


def check_result_out(out: Path) -> None:
    """`eval checkpoint --out FILE`: a new file, or an earlier result of ours; never inside a checkpoint or dataset."""
    where = protected_place(out)
    if where:
        raise EvalError(f"--out {out} lies inside {where}; results go elsewhere: choose another --out")
    check_out_parent(out)
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise EvalError(f"--out {out} exists and is not a regular file; choose another --out")
    if out.exists() and not is_our_result(out):
        raise EvalError(f"--out {out} exists and is not an earlier eval result (a JSON with tag, tasks and "
                        f"lm_eval_version); it is not replaced: choose another --out")


def publish(run, record: dict, log=print) -> None:
    """A run checkpoint's HellaSwag scores into TensorBoard (RUN/tb/eval) and, when the run logs to W&B, there too,
    at the checkpoint's step (train.wandb_log.log_eval). A failure there is one warning: the result is kept."""
    from train.wandb_log import log_eval
    step = record.get("step")
    metrics = {f"{task}/{name}": m[name] for task, m in record.get("tasks", {}).items()
               for name in ("acc", "acc_norm") if isinstance(m.get(name), (int, float))}
    if step is None or not metrics:
        return
    try:
        log_eval(run, step, metrics)
    except (PipelineError, OSError) as exc:  # W&B, or a run directory it cannot read the recipe of
        log(f"warning: scores not logged to TensorBoard / W&B: {exc}; they are in {RunDir(run).eval}")
