"""A run that heals from a bad batch: an update whose loss is not finite, or spikes, is skipped instead of applied.

The decision uses the loss every rank already agrees on (the all-reduced mean of the update's micro batches), so
each rank takes the same one without another collective. A skipped update drops its gradients through DeepSpeed's
own overflow path (what an fp16 overflow does): no optimizer step, no change to the weights or the optimizer's
state, the engine's skipped_steps counted. The trainer's step count and the lr schedule do not move; the loader
does, so the skipped micro batches are consumed, never read again (a checkpoint records the position past them).
After heal.max_skips_in_a_row skips in a row the run stops with the last good checkpoint named.

The recipe's `heal` section (Heal) is here too; this module loads no torch until an update is skipped.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from common.errors import shown

from .section import RecipeError, integer, is_int, is_number, number


# The spike test compares a loss with the mean of the last SPIKE_WINDOW applied updates, once it has at least
# SPIKE_MIN of them. Checkpoints hold the window and the streak (Healer.state_dict), so a resumed run judges each
# update as the uninterrupted run would have.
SPIKE_WINDOW = 50
SPIKE_MIN = 10
# NON_FINITE_GRADIENTS: the loss was finite, but DeepSpeed's optimizer found inf/NaN in the gradients and dropped
# the update itself (ZeRO 1-3 and its bf16 wrapper check; a bare torch optimizer at ZeRO-0 fp32 applies it).
NON_FINITE, SPIKE, NON_FINITE_GRADIENTS = "non-finite", "spike", "non-finite gradients"


@dataclass(frozen=True)
class Heal:
    # Skipped updates in a row before the run stops (0: the first non-finite loss stops it).
    max_skips_in_a_row: int = 5
    # Skip an update whose loss exceeds this factor times the recent mean (null: off).
    spike_factor: float | None = None
    # Minutes without a finished update before the watchdog dumps every stack and exits for a requeue (0: off).
    watchdog_minutes: float = 30

    def check(self) -> None:
        integer("heal.max_skips_in_a_row", self.max_skips_in_a_row, low=0, high=10 ** 6)
        factor = self.spike_factor
        if factor is not None and not (is_number(factor) and 1 < factor <= 1e6):
            raise RecipeError(f"heal.spike_factor must be a number above 1 and at most 1e6 (or null: no spike "
                              f"test), got {shown(factor)}")
        # At most 30 days: no update takes a month.
        number("heal.watchdog_minutes", self.watchdog_minutes, high=30 * 24 * 60,
               what="a non-negative number of minutes (0: no watchdog), at most 43,200")


class TooManySkips(Exception):
    """max_skips_in_a_row exceeded; the trainer turns it into its stop with the last good checkpoint named."""


class Healer:
    """Judges each update's agreed loss; keeps the recent losses and the count of skips in a row."""

    def __init__(self, section: Heal):
        self.section = section
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.in_a_row = 0
        self.first_skipped: int | None = None  # the update number of the first skip of the current streak

    def state_dict(self) -> dict:
        """For a checkpoint's client state. The window is a float64 tensor of SPIKE_WINDOW slots, NaN where no loss
        is yet (only finite losses join it), so every checkpoint's state has the same size whatever the step."""
        import torch
        window = torch.full((SPIKE_WINDOW,), math.nan, dtype=torch.float64)
        window[:len(self.recent)] = torch.tensor(list(self.recent), dtype=torch.float64)
        return {"recent": window, "in_a_row": self.in_a_row, "first_skipped": self.first_skipped}

    def load_state_dict(self, state: dict) -> None:
        import torch
        window, in_a_row, first = state["recent"], state["in_a_row"], state["first_skipped"]
        if not (torch.is_tensor(window) and window.dtype == torch.float64 and window.shape == (SPIKE_WINDOW,)
                and is_int(in_a_row) and (first is None or is_int(first))):
            raise ValueError(f"not a heal state: {shown(state)}")
        self.recent = deque((x for x in window.tolist() if math.isfinite(x)), maxlen=SPIKE_WINDOW)
        self.in_a_row, self.first_skipped = in_a_row, first

    def judge(self, loss: float, update: int, gradients_finite: bool = True) -> str | None:
        """None to apply the update (call `applied` once it is), else why it is skipped; raises TooManySkips when
        this skip is one more than heal.max_skips_in_a_row allows. gradients_finite=False: the optimizer has
        dropped the update itself, which counts as a skip whatever the loss."""
        reason = self._reason(loss) if gradients_finite else NON_FINITE_GRADIENTS
        if reason is None:
            return None
        self.in_a_row += 1
        if self.first_skipped is None:
            self.first_skipped = update
        if self.in_a_row > self.section.max_skips_in_a_row:
            raise TooManySkips(self.describe(reason, loss))
        return reason

    def applied(self, loss: float) -> None:
        """The update of this loss was applied: the loss joins the window, a streak of skips ends."""
        self.recent.append(loss)
        self.in_a_row, self.first_skipped = 0, None

    def _reason(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return NON_FINITE
        factor = self.section.spike_factor
        if factor is not None and len(self.recent) >= SPIKE_MIN and loss > factor * self.mean():
            return SPIKE
        return None

    def mean(self) -> float:
        return sum(self.recent) / len(self.recent)

    def describe(self, reason: str, loss: float) -> str:
        if reason == NON_FINITE:
            return f"loss is {loss}"
        if reason == NON_FINITE_GRADIENTS:
            return f"gradients are not finite (loss {loss:.4f})"
        return f"loss {loss:.4f} is above {self.section.spike_factor} x the recent mean {self.mean():.4f}"

    def record(self, update: int, reason: str, loss: float) -> dict:
        """The metrics.jsonl line of a skipped update: JSON has no NaN, so a non-finite loss is null."""
        return {"step": update, "skipped": reason, "loss": loss if math.isfinite(loss) else None,
                "skips_in_a_row": self.in_a_row}


def skip_update(engine) -> None:
    """Take the accumulation boundary's engine.step() without applying the update: call it where engine.step()
    would be called after the last micro batch's backward, on every rank.

    Each of DeepSpeed's optimizer wrappers has a path that drops an overflowed step (clears the reduced and
    accumulated gradients, steps nothing, leaves the optimizer state and fp32 masters as they were); the wrapper's
    overflow test is made to answer yes for this one call, so the wrapper's own code does the dropping and the
    engine counts it in skipped_steps and leaves its lr scheduler alone. A bare torch optimizer (ZeRO-0 fp32) has
    no such path: its step() is a no-op for the call, and the engine clears the module's gradients as after any
    step. What changes: engine.global_steps and skipped_steps (DeepSpeed's counters), nothing the model computes.
    """
    import torch
    opt = engine.optimizer
    patched: dict = {}

    def overflowed(*args, **kwargs):
        opt.overflow = True
        return True

    if hasattr(opt, "_overflow_check_and_loss_scale_update"):  # ZeRO-3
        patched["_overflow_check_and_loss_scale_update"] = overflowed
    elif hasattr(opt, "check_grad_overflow") and hasattr(opt, "check_overflow"):  # ZeRO-1/2
        patched.update(check_grad_overflow=True, check_overflow=overflowed)
    elif hasattr(opt, "clear_hp_grads") and hasattr(opt, "get_grads_for_norm"):  # BF16_Optimizer (ZeRO-0/1 bf16)
        # Its only skip test is an invalid global norm: hand it a NaN gradient to measure.
        nan = torch.full((1,), float("nan"), device=engine.device)
        patched["get_grads_for_norm"] = lambda *args, **kwargs: ([nan], [])
    else:  # a bare torch optimizer under ZeRO-0
        patched.update(step=lambda *args, **kwargs: None, overflow=True)
    saved = {name: opt.__dict__[name] for name in patched if name in opt.__dict__}
    opt.__dict__.update(patched)
    try:
        engine.step()
    finally:
        for name in patched:
            if name in saved:
                opt.__dict__[name] = saved[name]
            else:
                opt.__dict__.pop(name, None)
    if hasattr(opt, "overflow") and "overflow" not in patched:
        opt.overflow = False  # the next update's own test sets it again; nothing reads it in between
    if getattr(engine, "_step_applied", False):
        raise RuntimeError("DeepSpeed applied an update that was to be skipped")  # a wrapper this code does not know
