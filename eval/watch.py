"""`eval watch RUN`: score each complete checkpoint of a (possibly still running) training run exactly once.

A checkpoint is complete once RUN/checkpoints/latest names it or a later step (DeepSpeed writes `latest`
after the tag directory is whole), so a tag still being written is never touched. Each evaluation runs as its
own `python -m eval checkpoint` process: a crash (out of memory, a killed node) costs one attempt, not the
watcher. Work is shared safely between watchers through one lock file per checkpoint (fcntl, released by the
kernel if a watcher dies), and results.jsonl is the record of what is done.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .harness import EvalError

TAG_RE = re.compile(r"^global_step(\d+)$")


def read_latest_step(run: Path) -> int | None:
    latest = run / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    match = TAG_RE.match(latest.read_text().strip())
    return int(match.group(1)) if match else None


def complete_checkpoints(run: Path) -> dict[str, Path]:
    """{tag: dir} of checkpoints at or before the step `latest` names, oldest first."""
    latest = read_latest_step(run)
    if latest is None:
        return {}
    found = []
    for path in (run / "checkpoints").iterdir():
        match = TAG_RE.match(path.name)
        if match and path.is_dir() and int(match.group(1)) <= latest:
            found.append((int(match.group(1)), path))
    return {path.name: path for _, path in sorted(found)}


def scored_tags(results: Path) -> set[str]:
    if not results.exists():
        return set()
    tags = set()
    for line in results.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            tags.add(json.loads(line).get("tag"))
    return tags


def append_line(path: Path, record: dict) -> None:
    """One whole line, under an exclusive lock, flushed to disk: concurrent writers never interleave."""
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a writer killed mid-line: keep its fragment off our line
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def read_recipe(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.exists():
        return {}
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise EvalError(f"{path} is not valid YAML: {exc}") from None
    return recipe if isinstance(recipe, dict) else {}


def final_step(recipe: dict) -> int | None:
    """The step of the run's last checkpoint: schedule.max_steps, or max_tokens rounded up to whole steps."""
    schedule, batch = recipe.get("schedule") or {}, recipe.get("batch") or {}
    if schedule.get("max_steps"):
        return int(schedule["max_steps"])
    if schedule.get("max_tokens") and batch.get("total_tokens"):
        return -(-int(schedule["max_tokens"]) // int(batch["total_tokens"]))
    return None


@contextlib.contextmanager
def try_lock(path: Path):
    """Yields True while holding an exclusive lock on `path`, False if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Watcher:
    def __init__(self, run: Path, eval_args: list[str], max_attempts: int = 3, python: str = sys.executable,
                 log=print):
        self.run = Path(run).resolve()
        if not (self.run / "checkpoints").is_dir() and not (self.run / "config.yaml").exists():
            raise EvalError(f"{self.run} is not a run directory (no checkpoints/ and no config.yaml)")
        self.out = self.run / "eval"
        self.results = self.out / "results.jsonl"
        self.eval_args = eval_args
        self.max_attempts = max_attempts
        self.python = python
        self.log = log
        recipe = read_recipe(self.run)
        self.max_steps = final_step(recipe)
        self.command = (recipe.get("eval") or {}).get("command")
        self.seen: set[str] = set()      # tags seen complete by this watcher
        self.finished: dict[str, str] = {}  # tag -> "scored" | "rotated" | "failed"

    def _attempts_file(self, tag: str) -> Path:
        return self.out / ".watch" / f"{tag}.attempts"

    def _attempts(self, tag: str) -> int:
        path = self._attempts_file(tag)
        return int(path.read_text() or 0) if path.exists() else 0

    def final_tag(self) -> str | None:
        return f"global_step{self.max_steps}" if self.max_steps else None

    def poll_once(self) -> None:
        """Score every complete checkpoint not yet scored; notes rotated-away ones."""
        self.out.mkdir(parents=True, exist_ok=True)
        complete = complete_checkpoints(self.run) if (self.run / "checkpoints").is_dir() else {}
        done = scored_tags(self.results)
        for tag in sorted(self.seen - set(complete) - done - set(self.finished)):
            self._note(tag, "rotated", "rotated away (checkpoint.keep_last) before it was evaluated; skipped")
        self.seen |= set(complete)
        for tag, path in complete.items():
            if tag in done:
                self.finished.setdefault(tag, "scored")
            elif tag not in self.finished:
                self._evaluate(tag, path)

    def _note(self, tag: str, outcome: str, message: str) -> None:
        self.finished[tag] = outcome
        self.log(f"eval watch: {tag}: {message}")

    def _evaluate(self, tag: str, path: Path) -> None:
        if not path.exists():  # complete when we listed it, deleted while an earlier one was being scored
            self._note(tag, "rotated", "rotated away (checkpoint.keep_last) before it was evaluated; skipped")
            return
        with try_lock(self.out / ".watch" / f"{tag}.lock") as locked:
            if not locked:
                return  # another watcher is scoring it; its line will show up in results.jsonl
            if tag in scored_tags(self.results):  # finished by another watcher since we looked
                self.finished[tag] = "scored"
                return
            attempts = self._attempts(tag)
            if attempts >= self.max_attempts:
                self._note(tag, "failed", f"gave up after {attempts} failed attempts; nothing recorded")
                return
            per_ckpt = self.out / f"{tag}.json"
            if not per_ckpt.exists():  # else: scored by a watcher that died before appending its line
                self.log(f"eval watch: scoring {tag} (attempt {attempts + 1} of {self.max_attempts})")
                cmd = [self.python, "-m", "eval", "checkpoint", str(path), "--out", str(per_ckpt), *self.eval_args]
                rc = subprocess.run(cmd).returncode
                if rc != 0:
                    if not path.exists():
                        self._note(tag, "rotated", "rotated away while it was being evaluated; skipped")
                        return
                    self._attempts_file(tag).write_text(str(attempts + 1))
                    self.log(f"eval watch: {tag}: evaluation failed (exit status {rc}); will retry")
                    if attempts + 1 >= self.max_attempts:
                        self._note(tag, "failed", f"gave up after {attempts + 1} failed attempts; nothing recorded")
                    return
            record = json.loads(per_ckpt.read_text())
            if self.command:
                record["command"] = self._run_command(path)
            append_line(self.results, record)
            self.finished[tag] = "scored"
            scores = ", ".join(f"{name} acc_norm {m.get('acc_norm', float('nan')):.4f}"
                               for name, m in record.get("tasks", {}).items())
            self.log(f"eval watch: {tag} scored: {scores}")

    def _run_command(self, path: Path) -> dict:
        """The recipe's eval.command for this checkpoint; its exit status is recorded, never retried."""
        command = self.command.replace("{ckpt}", str(path)).replace("{run}", str(self.run))
        rc = subprocess.run(command, shell=True, cwd=self.run).returncode
        if rc != 0:
            self.log(f"eval watch: eval.command exited with status {rc}: {command}")
        return {"cmd": command, "returncode": rc}

    def watch(self, poll: float, until_final: bool, once: bool = False) -> int:
        final = self.final_tag()
        if until_final and final is None:
            raise EvalError(f"--until-final needs schedule.max_steps or schedule.max_tokens and batch.total_tokens "
                            f"in {self.run / 'config.yaml'}")
        while True:
            self.poll_once()
            if once:
                return 0
            if until_final and final in self.finished:
                return 0 if self.finished[final] == "scored" else 1
            time.sleep(poll)
