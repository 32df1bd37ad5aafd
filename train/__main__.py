"""python -m train --config configs/train/NAME.yaml [--set key=value ...]

Alone, or under torchrun / deepspeed / srun. Exit status (common.cli): 0 done, 1 failure, 2 bad recipe or usage,
99 preempted by SIGUSR1/SIGTERM after saving a checkpoint (requeue and run the same command to continue), 98 the
watchdog saw no update finish for heal.watchdog_minutes (requeue likewise: it resumes from the last checkpoint).
"""
from __future__ import annotations

import argparse
import sys
import time

from common import cli

from . import summary
from .stop import StopFlag


def build_parser(stop: StopFlag) -> cli.Parser:
    parser = cli.Parser(prog=cli.invoked_as("python -m train"), description="GPT-2 pretraining with DeepSpeed")
    parser.add_argument("--config", required=True, help="recipe YAML (configs/train/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set batch.micro_batch=8 (repeatable)")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="on resume, accept this recipe key differing from the checkpoint's, e.g. "
                             "--allow-change optim.max_lr (repeatable; recorded in RUN/recipe_history.jsonl)")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same and is what we use.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(run=lambda args: train(args, stop))
    return parser


def train(args, stop: StopFlag) -> int:
    from .recipe import load
    recipe = load(args.config, args.overrides)
    from .trainer import Trainer
    try:
        trainer = Trainer(recipe, allow_change=args.allow_change)
        started = time.monotonic()
        status = trainer.run(stop)
        if status == 0 and trainer.is_main and hasattr(trainer, "engine"):  # trained to the end just now
            print(summary.of(trainer, time.monotonic() - started), flush=True)
        return status
    finally:
        close_process_group()


def main(argv=None) -> int:
    stop = StopFlag()  # before torch and DeepSpeed load: a preemption signal during start-up is not a crash
    return cli.run(build_parser(stop), argv)


def close_process_group() -> None:
    # Left to interpreter shutdown, gloo's worker threads are sometimes destroyed while joinable, and the rank
    # dies with SIGABRT ("terminate called without an active exception") after finishing its work.
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
