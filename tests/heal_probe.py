"""`python -m tests.heal_probe ARGS`: `python -m train ARGS` with a fault injected, for the tests of train.heal and
train.watchdog. It runs tests.live_fp32_train's trainer (the real Trainer, which also writes the live fp32 weights
at the end) and injects, by environment variable, counting updates from 1 in each process (skipped ones count):

    HEAL_PROBE_NAN=U[+][:R]   a forward hook makes the loss of every micro batch of update U (U+: of U and every
                              later one) NaN, on rank R only (default: every rank); backward then makes NaN gradients
    HEAL_PROBE_DROP=U         before update U, the loader's micro batches of one update are drawn and dropped: the
                              reference run that never saw the batch the NaN run skips
    HEAL_PROBE_HANG=U:R       rank R sleeps an hour inside update U's first forward (for the watchdog)

A test tool, not part of the trainer; launch it as train is launched (tests.fixtures_run.train_command with
module="tests.heal_probe").
"""
import os
import sys
import time

import train.trainer
from tests.live_fp32_train import AuditedTrainer
from train.__main__ import main


def _spec(name: str):
    """(update, from_then_on, rank or None) of HEAL_PROBE_<name>, None when unset."""
    raw = os.environ.get(f"HEAL_PROBE_{name}")
    if not raw:
        return None
    update, _, rank = raw.partition(":")
    return int(update.rstrip("+")), update.endswith("+"), int(rank) if rank else None


class ProbeTrainer(AuditedTrainer):
    attempts = 0  # train_step calls in this process

    def _hits(self, spec) -> bool:
        if spec is None:
            return False
        update, onwards, rank = spec
        return (self.attempts == update or (onwards and self.attempts > update)) and rank in (None, self.place.rank)

    def build(self) -> None:
        super().build()

        def hook(module, args, output):
            if self._hits(_spec("HANG")):
                time.sleep(3600)
            if self._hits(_spec("NAN")):
                logits, loss = output
                return logits, loss * float("nan")
            return output

        self.engine.module.register_forward_hook(hook)

    def train_step(self) -> dict:
        self.attempts += 1
        if self._hits(_spec("DROP")):
            for _ in range(self.plan.grad_accum):
                self.loader.next()
        return super().train_step()


if __name__ == "__main__":
    train.trainer.Trainer = ProbeTrainer
    sys.exit(main())
