"""Weights & Biases (recipe key log.wandb): the run's scalars mirrored to a W&B run, rank 0 only, optional.

The package is the optional extra `wandb` (pip install -e '.[wandb]'). The W&B run's id is drawn once, at the
first start, and kept in RUN/wandb_id: a requeued or resumed training continues the same W&B run (resume "allow").
Steps are logged as a metric ("step", the x axis of every other), not as W&B's own step, which only ever grows:
after a resume from the checkpoint at step S, the steps after S are logged again, as in metrics.jsonl.
WANDB_MODE=offline (compute nodes without network) writes RUN/wandb/offline-run-*; `wandb sync` uploads it later
from a machine with network. WANDB_DIR, when set, replaces RUN as the place of that wandb/ directory.

Eval jobs log their results with log_eval: to RUN/tb/eval (TensorBoard) and, when the run has a W&B id, to its
companion W&B run "<id>-eval" in the same group, so an eval job never writes into the W&B run training holds open.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from common import files
from common.errors import PipelineError

from .rundir import RunDir

DEFAULT_PROJECT = "gpt2-pipeline"


class WandbError(PipelineError):
    """log.wandb set without the package, or a W&B run that cannot be opened; the message says which."""


def check_available(log_section) -> None:
    """One line at start when the recipe asks for W&B and the package is missing."""
    if not log_section.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise WandbError("log.wandb is true but the wandb package is not installed: pip install -e '.[wandb]' "
                         "(or pip install wandb), or set log.wandb=false") from None


def run_id(run_dir) -> str:
    """RUN/wandb_id, drawn and written (atomically) at the first call."""
    path = RunDir(run_dir).wandb_id
    if path.exists():
        return path.read_text().strip()
    new = secrets.token_hex(4)  # W&B ids: short, [a-z0-9]
    files.write_text(path, new + "\n")
    return new


def _init(run_dir, log_section, wandb_id: str, config: dict | None, job_type: str):
    import wandb
    run_dir = Path(run_dir)
    name = log_section.wandb_name or run_dir.name
    try:
        run = wandb.init(project=log_section.wandb_project or DEFAULT_PROJECT, entity=log_section.wandb_entity,
                         name=name if job_type == "train" else f"{name}-eval", group=name, job_type=job_type,
                         id=wandb_id, resume="allow", dir=os.environ.get("WANDB_DIR") or str(run_dir),
                         config=config)
    except Exception as exc:  # wandb raises its own types for login, network and permission problems
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WandbError(f"log.wandb: cannot open the W&B run {wandb_id} ({first}); set WANDB_MODE=offline on "
                         f"machines without network, or log.wandb=false") from None
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


class WandbSink:
    """Receives what train.metrics.RunLog writes to TensorBoard: {tag: value} at a step."""

    def __init__(self, run_dir, recipe):
        self.run = _init(run_dir, recipe.log, run_id(run_dir), recipe.to_dict(), "train")

    def log(self, scalars: dict, step: int) -> None:
        self.run.log({**scalars, "step": step})

    def close(self) -> None:
        self.run.finish()


def log_eval(run_dir, step: int, metrics: dict) -> None:
    """An eval job's results at training step `step` ({name: number}, e.g. {"hellaswag/acc_norm": 0.29}): as
    eval/NAME in TensorBoard (RUN/tb/eval) and, for a run that trained with log.wandb, in W&B."""
    from torch.utils.tensorboard import SummaryWriter
    from .rundir import read_recipe
    scalars = {f"eval/{key}": float(value) for key, value in metrics.items()}
    writer = SummaryWriter(str(RunDir(run_dir).tensorboard / "eval"))
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    recipe = read_recipe(run_dir)
    if recipe is None or not recipe.log.wandb:
        return
    check_available(recipe.log)
    run = _init(run_dir, recipe.log, f"{run_id(run_dir)}-eval", None, "eval")
    try:
        run.log({**scalars, "step": step})
    finally:
        run.finish()
