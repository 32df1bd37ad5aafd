"""The run directory: every path in it, and the readers and writers of its files (as prep.reader is for datasets).

Train writes a run directory (rank 0, except the checkpoint files every rank writes); eval, `model sample` and
`eval export` read it and eval adds RUN/eval/. Nothing else spells a path inside it: ask RunDir.

    format.json            {"format": FORMAT}: the layout version of this run directory, written first
    config.yaml            the resolved recipe the newest checkpoint continues (write_recipe / read_recipe)
    recipe_history.jsonl   one line per resume that changed allowed keys
    train.lock             the lock of the training that writes here, naming its holder (train.writer)
    wandb_id               the W&B run's id, drawn at the first start (train.wandb_log)
    metrics.jsonl          training and validation lines (train.metrics appends, eval.report reads)
    samples.jsonl          sample texts
    tb/                    TensorBoard events
    checkpoints/           DeepSpeed tags with completion marks (train.rundir.checkpoints)
    checkpoints/rotated.jsonl  the tags rotation deleted, with their identities (train.rundir.identity)
    eval/                  <tag>.json per scored checkpoint, results.jsonl (append_result),
                           report.md, curves.png, .watch/ (the watcher's locks and marks)
    logs/                  the slurm/ scripts' logs

A run directory or checkpoint of another format version is refused in one line (earlier_version): nothing reads
the artefacts of earlier versions. The checkpoint layer (checkpoints.py) is imported on its own: this module loads
no torch.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from common import files, yamlfile
from common.errors import PipelineError

CHECKPOINTS = "checkpoints"
MARK = "complete.json"    # a checkpoint tag's completion mark (checkpoints.py)
SAVING = "saving.json"    # a tag being written: never read
# The version of the run directory's layout and of what its files hold (format.json and each checkpoint's
# complete.json record it); raised whenever a change means an earlier version's files would be misread.
FORMAT = 1


class RunDirError(PipelineError):
    """A run directory this version cannot use; the message names it and says why."""


def earlier_version(path, found) -> str:
    """The one line that refuses a run directory or checkpoint of another format version."""
    if isinstance(found, int) and not isinstance(found, bool) and found > FORMAT:
        return (f"{path} was written by a later version of this project (format {found}; this one reads "
                f"{FORMAT}): update this project")
    return f"{path} was written by an earlier version of this project (format {found or 0}, this one reads " \
           f"{FORMAT}): start a new run_dir"


class RunDir:
    """The paths of one run directory."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def format_file(self) -> Path:
        return self.path / "format.json"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def history(self) -> Path:
        return self.path / "recipe_history.jsonl"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def train_lock(self) -> Path:
        return self.path / "train.lock"

    @property
    def wandb_id(self) -> Path:
        return self.path / "wandb_id"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def rotated(self) -> Path:
        """One line per tag rotation deleted, with its identity (train.rundir.identity)."""
        return self.checkpoints / "rotated.jsonl"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    @property
    def results(self) -> Path:
        return self.eval / "results.jsonl"

    @property
    def watch(self) -> Path:
        """The eval watcher's locks, attempt counters and eval.command marks."""
        return self.eval / ".watch"

    @property
    def report(self) -> Path:
        return self.eval / "report.md"

    @property
    def curves(self) -> Path:
        return self.eval / "curves.png"

    def eval_result(self, tag: str) -> Path:
        """RUN/eval/<tag>.json: `eval checkpoint`'s record of one checkpoint."""
        return self.eval / f"{tag}.json"

    def looks_like_run(self) -> bool:
        """Train has started here (checkpoints/ or config.yaml)."""
        return self.checkpoints.is_dir() or self.config.exists()

    def check_format(self) -> None:
        """Refuse a run directory of another format version: one with train's files but no format.json, or
        another version in it. A directory train has not written yet (none, empty, only logs/) passes."""
        if not self.format_file.exists():
            if self.looks_like_run() or self.metrics.exists():
                raise RunDirError(earlier_version(self.path, None))
            return
        try:
            found = files.read_json(self.format_file).get("format")
        except (ValueError, AttributeError):
            found = None
        if found != FORMAT:
            raise RunDirError(earlier_version(self.path, found))

    def start(self) -> None:
        """Before train's first write: the directory exists, is of this format, and says so in format.json."""
        self.check_format()
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.format_file.exists():
            files.write_json(self.format_file, {"format": FORMAT})


def run_dir_of(path) -> RunDir | None:
    """The run directory a checkpoint path lies in (a run dir, its checkpoints dir, or a tag dir), else None."""
    path = Path(path).resolve()
    if (path / CHECKPOINTS).is_dir():
        return RunDir(path)
    if path.name == CHECKPOINTS:
        return RunDir(path.parent)
    if path.parent.name == CHECKPOINTS:
        return RunDir(path.parent.parent)
    return None


# ---- config.yaml and recipe_history.jsonl ----------------------------------------------------------------------
def read_recipe(run):
    """RUN/config.yaml as the trainer saved it (a train.recipe.Recipe), or None when the run has not started yet."""
    from train.recipe import Recipe, RecipeError
    RunDir(run).check_format()
    path = RunDir(run).config
    if not path.exists():
        return None
    try:
        raw = yamlfile.load(path)
    except PipelineError as exc:
        raise RecipeError(str(exc)) from None
    return Recipe.from_saved(raw if raw is not None else {}, str(path))


def write_recipe(run, recipe: dict, changes: dict | None = None, step: int = 0, checkpoint: str | None = None):
    """RUN/config.yaml := recipe (a plain mapping); with changes {key: (old, new)}, one recipe_history.jsonl line
    first, saying which checkpoint's recipe they changed at which step."""
    run = RunDir(run)
    run.start()
    if changes:
        files.append_line(run.history, json.dumps({
            "step": step, "time": round(time.time(), 3), "checkpoint": checkpoint,
            "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}}))
    files.write_text(run.config, yaml.safe_dump(recipe, sort_keys=False))


# ---- eval/results.jsonl -------------------------------------------------------------------------------------
def append_result(run, record: dict) -> None:
    files.append_json_line(RunDir(run).results, record)
