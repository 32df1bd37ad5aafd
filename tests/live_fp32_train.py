"""`python -m tests.live_fp32_train ARGS`: `python -m train ARGS` that, after a finished run, also writes
RUN/live_fp32_stepN.pt, the fp32 master weights as the live optimizer holds them, to audit checkpoint consolidation.

A test tool, not part of the trainer: it runs the real train CLI with the real Trainer, extended by one step at
the end. Launch it as train is launched (alone, torchrun -m, deepspeed --module); tests.fixtures_run.train_command
builds the command with module="tests.live_fp32_train".
"""
import sys

import torch

import train.trainer
from common import files
from train.__main__ import main


def live_fp32_weights(trainer) -> dict:
    """{parameter name: fp32 tensor} gathered from every rank (a collective: every rank must call it)."""
    from deepspeed.utils import safe_get_full_fp32_param
    weights = {}
    for name, p in trainer.engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        weights[name] = (p.detach() if full is None else full).float().cpu().clone()
    return weights


class AuditedTrainer(train.trainer.Trainer):
    def run(self, stop) -> int:
        status = super().run(stop)
        if status == 0 and hasattr(self, "engine"):  # not for a run that was already complete
            weights = live_fp32_weights(self)
            if self.is_main:
                with files.atomic_file(self.run_dir / f"live_fp32_step{self.step}.pt") as f:
                    torch.save(weights, f)
        return status


if __name__ == "__main__":
    # train.__main__ imports its Trainer when a command runs: this is the one it gets.
    train.trainer.Trainer = AuditedTrainer
    sys.exit(main())
