"""`eval watch RUN`: score each complete checkpoint of a (possibly still running) training run exactly once.

Which checkpoints are complete is train.rundir.checkpoints' rule (train's completion mark, written after every rank
has finished the tag), so a tag still being written is never touched. The
checkpoints found at one poll are scored by one `python -m eval checkpoint A B ...` child (start-up paid once):
a crash (out of memory, a killed node) costs one attempt, not the watcher. `--only TAG` is the per-checkpoint
eval job's mode; eval.dispatch submits those jobs instead of scoring. Work is shared safely between watchers
through one lock file per checkpoint (fcntl, released by the kernel if a watcher dies), and results.jsonl is the
record of what is done. The scoring child shares the lock and
dies with its watcher, so a killed watcher leaves no evaluation behind that a later one would repeat.
eval.command runs at most once and is never dropped: the watcher writes a claim, the command's own process marks
that it started before it execs the shell (start_mark), and a later watcher runs a claimed command only if no
start mark is there.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import files
from common.errors import UsageError
from common.process import die_with_parent
from train.rundir import RunDir, append_result, read_recipe
from train.rundir.checkpoints import complete_tags, incomplete_reason, step_of, tag_dirs

from . import results
from .harness import EvalError


def complete_checkpoints(run: Path) -> dict[str, Path]:
    """{tag: dir} of the run's complete checkpoints, oldest first."""
    return {path.name: path for path in complete_tags(RunDir(run).checkpoints)}


PLACEHOLDER = re.compile(r"\{(ckpt|run)\}")


def fill_command(template: str, ckpt: Path, run: Path) -> str:
    """eval.command with {ckpt} and {run} replaced by shell-quoted paths, in one pass.

    Quoted, a space or `$(...)` in a path stays part of the path; one pass, so a path that itself contains
    "{run}" is not substituted again.
    """
    values = {"ckpt": shlex.quote(str(ckpt)), "run": shlex.quote(str(run))}
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def start_mark(mark: Path, command: str, lock_fd: int):
    """A preexec_fn for eval.command's process: write `mark`, then let go of the checkpoint's lock, then exec.

    The child got the lock file (pass_fds) so that the lock stays held from the watcher's claim until the mark
    exists, even if the watcher dies in between: a later watcher that gets the lock sees either the mark (the
    command runs, or ran) or no child at all. Closed before exec, so the command, which may outlive its watcher,
    does not keep the next watcher waiting. A mark it cannot write (a full disk) fails the start: nothing runs.
    """
    def preexec():
        files.write_text(mark, f"{files.this_process()}\n{command}\n")
        os.close(lock_fd)
    return preexec


class Watcher:
    def __init__(self, run: Path, eval_args: list[str], max_attempts: int = 3, python: str = sys.executable,
                 log=print, only: list[str] | None = None):
        self.run = Path(run).resolve()
        self.dir = RunDir(self.run)
        if not self.dir.looks_like_run():
            raise EvalError(f"{self.run} is not a run directory (no {self.dir.checkpoints.name}/ and no "
                            f"{self.dir.config.name})")
        self.eval_args = eval_args
        self.max_attempts = max_attempts
        self.python = python
        self.log = log
        self.only = None if only is None else list(dict.fromkeys(only))  # --only: these tags and no others
        recipe = read_recipe(self.run)  # train's own loader: the final step is the one train stops at
        self.max_steps = None if recipe is None else recipe.max_steps
        self.command = None if recipe is None else recipe.eval.command
        self._check_only()
        self.seen: set[str] = set()      # tags seen complete by this watcher
        self.finished: dict[str, str] = {}  # tag -> "scored" | "rotated" | "failed"
        self.waiting: set[str] = set()   # --only tags the run has not written yet

    def _attempts_file(self, tag: str) -> Path:
        return self.dir.watch / f"{tag}.attempts"

    def _attempts(self, wanted: tuple) -> int:
        """Failed evaluations of the checkpoint with key `wanted` (results.key_of). A tag name comes back (a run
        restarted from scratch writes global_step3 again), so the count is of one checkpoint identity: another
        checkpoint's count under the same name starts a new one at 0."""
        path = self._attempts_file(wanted[0])
        if not path.exists():
            return 0
        hint = f"remove it to count {wanted[0]}'s evaluation attempts from 0"
        try:
            record = files.read_json(path, EvalError)
        except EvalError as exc:
            raise EvalError(f"{exc}; {hint}") from None
        if isinstance(record, int) and not isinstance(record, bool):  # a count without an identity (older watcher)
            return record
        if not (isinstance(record, dict) and isinstance(record.get("attempts"), int)):
            raise EvalError(f"{path} is not an attempts record (JSON with checkpoint_id and attempts); {hint}")
        return record["attempts"] if record.get("checkpoint_id") == wanted[1] else 0

    def _failed_attempt(self, wanted: tuple, attempts: int) -> None:
        files.write_json(self._attempts_file(wanted[0]),
                         {"tag": wanted[0], "checkpoint_id": wanted[1], "attempts": attempts})

    def _give_up(self, tag: str, path: Path, reason: str) -> None:
        """Stop trying `tag`, and say so in results.jsonl, where `eval report` lists it with the reason."""
        recorded = results.record_given_up(self.run, path, reason)
        self._note(tag, "failed", reason + (f"; recorded in {self.dir.results}" if recorded else ""))

    def _claim_file(self, tag: str) -> Path:
        """The watcher's claim to run eval.command for `tag`, written just before it starts the command."""
        return self.dir.watch / f"{tag}.command"

    def _started_file(self, tag: str) -> Path:
        """Written by the command's own process before it execs: the command ran, or runs."""
        return self.dir.watch / f"{tag}.command.started"

    def _claimed_by(self, tag: str) -> str | None:
        """Who claimed eval.command for `tag` (None: nobody)."""
        claim = self._claim_file(tag)
        return files.read_json(claim)["claimed_by"] if claim.exists() else None

    def _check_only(self) -> None:
        """--only names checkpoints this run can write: a name that is no tag, or a step after the run's last, is a
        usage error now rather than a wait for ever (or an exit 0 that scored nothing)."""
        for tag in self.only or []:
            step = step_of(tag)
            if step is None:
                raise UsageError(f"--only {tag}: not a checkpoint tag (global_stepN)")
            if self.max_steps is not None and step > self.max_steps:
                raise UsageError(f"--only {tag}: {self.run} stops at step {self.max_steps}, so it never writes "
                                 f"{tag} (its last checkpoint is {self.final_tag()})")

    def final_tag(self) -> str | None:
        return f"global_step{self.max_steps}" if self.max_steps else None

    def poll_once(self) -> None:
        """Score every complete checkpoint not yet scored; record the ones rotation deleted unscored."""
        self.dir.watch.mkdir(parents=True, exist_ok=True)
        complete = complete_checkpoints(self.run)
        if self.only is not None:
            complete = {tag: path for tag, path in complete.items() if tag in self.only}
            self._note_unlisted(set(self.only) - set(complete) - self.seen - set(self.finished))
        scored = results.scored_keys(self.run)
        # By identity: a tag name of a run restarted from scratch is another model, scored again.
        done = {tag for tag, path in complete.items() if results.key_of(path) in scored}
        for tag in sorted(self.seen - set(complete) - {tag for tag, _ in scored} - set(self.finished)):
            self._note(tag, "rotated", "rotated away (checkpoint.keep_last) before it was evaluated; skipped")
        self.seen |= set(complete)
        pending = []
        for tag, path in complete.items():
            if tag in done:
                self.finished.setdefault(tag, "scored")
            elif tag not in self.finished:
                pending.append((tag, path))
        if pending:
            self._evaluate(pending)
        # Last: rotation at the final save runs while that checkpoint is scored, and the watcher may exit next.
        results.record_rotated_unscored(self.run, self.log)

    def _note_unlisted(self, tags: set[str]) -> None:
        """--only names tags that are not complete checkpoints (never seen complete by this watcher)."""
        for tag in sorted(tags):
            path = self.dir.checkpoints / tag
            if not path.exists():
                written = tag_dirs(path.parent)
                if not written or step_of(tag) > step_of(written[-1].name):  # the run has not got there yet
                    if tag not in self.waiting:
                        newest = written[-1].name if written else "none yet"
                        self.log(f"eval watch: {tag}: not written yet (newest checkpoint: {newest}); waiting for it")
                        self.waiting.add(tag)
                    continue
                self._note(tag, "rotated", "not in checkpoints/ (rotated away by checkpoint.keep_last?); skipped")
            else:
                self._note(tag, "failed", f"not a complete checkpoint: {incomplete_reason(path)}")

    def _note(self, tag: str, outcome: str, message: str) -> None:
        self.finished[tag] = outcome
        self.log(f"eval watch: {tag}: {message}")

    def _evaluate(self, pending: list[tuple[str, Path]]) -> None:
        """Score the pending checkpoints whose locks this watcher gets, all in one `eval checkpoint` child."""
        with contextlib.ExitStack() as locks:
            mine = []  # (tag, path, failed attempts so far, lock file)
            for tag, path in pending:
                if not path.exists():  # complete when we listed it, deleted while an earlier one was being scored
                    self._note(tag, "rotated", "rotated away (checkpoint.keep_last) before it was evaluated; skipped")
                    continue
                lock_file = locks.enter_context(files.try_lock(self.dir.watch / f"{tag}.lock"))
                if lock_file is None:
                    continue  # another watcher (or the scoring child of a dead one) has it; its line will show up
                wanted = results.key_of(path)
                if wanted in results.scored_keys(self.run):  # finished by another watcher since we looked
                    self.finished[tag] = "scored"
                    continue
                attempts = self._attempts(wanted)
                if attempts >= self.max_attempts:
                    self._give_up(tag, path, self._give_up_reason(tag, attempts))
                    continue
                mine.append((tag, path, attempts, lock_file, wanted))
            # A <tag>.json of this checkpoint already there was scored by a watcher that died before appending
            # its line (one of an earlier checkpoint of the same name is scored over).
            to_score = [item for item in mine if results.result_of(self.run, item[4]) is None]
            rc = self._score(to_score) if to_score else 0
            blamed = False
            for tag, path, attempts, lock_file, wanted in mine:
                per_ckpt = results.result_of(self.run, wanted)
                if per_ckpt is not None:
                    self._record(tag, path, per_ckpt, lock_file)
                elif not path.exists():
                    self._note(tag, "rotated", "rotated away while it was being evaluated; skipped")
                elif not blamed:
                    # The child scores in order and goes on past a checkpoint it cannot load, so the first one
                    # without a result is the one it failed on (or was killed during); later ones were not
                    # necessarily tried and cost no attempt.
                    blamed = True
                    self._failed_attempt(wanted, attempts + 1)
                    if attempts + 1 >= self.max_attempts:
                        reason = self._give_up_reason(tag, attempts + 1, f"the last exited with status {rc}")
                        self._give_up(tag, path, reason)
                    else:
                        self.log(f"eval watch: {tag}: evaluation failed (exit status {rc}); will retry")

    def _give_up_reason(self, tag: str, attempts: int, last: str = "") -> str:
        return (f"gave up after {attempts} failed evaluation attempts" + (f" ({last})" if last else "")
                + f" (--max-attempts {self.max_attempts}; remove {self._attempts_file(tag)} to try again)")

    def _score(self, items: list) -> int:
        """One `python -m eval checkpoint A B ...` child for all of them (the tasks are loaded once); its exit status.

        The child holds the locks too (pass_fds) and is killed with the watcher: a watcher killed mid-evaluation
        leaves nothing running that would score, or be recorded, a second time.
        """
        cmd = [self.python, "-m", "eval", "checkpoint", *(str(path) for _, path, *_ in items), *self.eval_args]
        if len(items) == 1:
            cmd += ["--out", str(self.dir.eval_result(items[0][0]))]
        child = subprocess.Popen(cmd, pass_fds=[item[3].fileno() for item in items],
                                 preexec_fn=functools.partial(die_with_parent, os.getpid()))
        tags = ", ".join(f"{tag} (attempt {attempts + 1} of {self.max_attempts})" for tag, _, attempts, *_ in items)
        self.log(f"eval watch: scoring {tags} (pid {child.pid})")
        return child.wait()

    def _record(self, tag: str, path: Path, per_ckpt: Path, lock_file) -> None:
        """Append the scored checkpoint to results.jsonl (with eval.command's outcome): done, under its lock."""
        record = files.read_json(per_ckpt, EvalError)
        if self.command:
            record["command"] = self._run_command(tag, path, lock_file)
        append_result(self.run, record)
        for marker in (self._started_file(tag), self._claim_file(tag)):  # results.jsonl records it now
            marker.unlink(missing_ok=True)
        self.finished[tag] = "scored"
        scores = ", ".join(f"{name} acc_norm {m.get('acc_norm', float('nan')):.4f}"
                           for name, m in record.get("tasks", {}).items())
        self.log(f"eval watch: {tag} scored: {scores}")

    def _run_command(self, tag: str, path: Path, lock_file) -> dict:
        """The recipe's eval.command for this checkpoint, once: its exit status is recorded, never retried.

        Called under the checkpoint's lock, so whoever claimed the command before is gone. Its start mark means
        the command started (it may still be running, as the orphan of that watcher): recorded as such, not
        started again. A claim without a start mark means that watcher died before the command's process got
        going: the command never ran, so it runs now. Only the command's own process killed in the instant between
        its mark and its exec (Slurm ending the whole job) is marked without having run: never twice comes first.
        """
        command = fill_command(self.command, path, self.run)
        started = self._started_file(tag)
        claimed_by = self._claimed_by(tag)
        if started.exists():
            self.log(f"eval watch: {tag}: eval.command was started by a watcher killed before it finished; "
                     f"not run again: {command}")
            return {"cmd": command, "returncode": None,
                    "note": "started by a watcher that was killed before it finished; not run again"}
        if claimed_by is not None:
            self.log(f"eval watch: {tag}: eval.command was claimed by a watcher killed before it started it "
                     f"({claimed_by}); running it now")
        files.write_json(self._claim_file(tag), {"command": command, "claimed_by": files.this_process()})
        try:
            child = subprocess.Popen(command, shell=True, cwd=self.run, pass_fds=[lock_file.fileno()],
                                     preexec_fn=start_mark(started, command, lock_file.fileno()))
        except subprocess.SubprocessError as exc:  # the start mark could not be written: nothing ran
            raise EvalError(f"eval.command for {tag} not started: cannot write its start mark {started} ({exc}); "
                            f"free space there and rerun the watcher") from exc
        rc = child.wait()
        if rc != 0:
            self.log(f"eval watch: eval.command exited with status {rc}: {command}")
        return {"cmd": command, "returncode": rc}

    def settled(self) -> bool:
        """Nothing this watcher started is still under way (it scores in its own children, so never)."""
        return True

    def watch(self, poll: float, until_final: bool, once: bool = False) -> int:
        final = self.final_tag()
        if until_final and final is None:
            raise EvalError(f"--until-final needs schedule.max_steps or schedule.max_tokens and batch.total_tokens "
                            f"in {self.dir.config}")
        while True:
            self.poll_once()
            if self.only is not None and (once or all(tag in self.finished for tag in self.only)):
                # Rotated away counts as done: keep_last chose not to keep it, nothing is left to score.
                return 0 if all(self.finished.get(tag) in ("scored", "rotated") for tag in self.only) else 1
            if once:
                return 0
            if until_final and final in self.finished and self.settled():
                return 0 if self.finished[final] == "scored" else 1
            time.sleep(poll)
