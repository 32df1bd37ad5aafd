"""Learning rate: a multiplier of each param group's peak lr, the same for every group (AdamW's and Muon's).

`step` is the 0-based index of the optimizer update about to be taken (as in build-nanogpt's get_lr). Both kinds
share the warmup: update 0 uses 1 / warmup_steps of the peak, update warmup_steps - 1 the peak itself. Then

- cosine: a half cosine from the peak (at update warmup_steps - 1) to min_lr_ratio at the last update max_steps - 1;
- wsd (warmup-stable-decay): the peak held until the last `decay_steps` updates, over which it falls to
  min_lr_ratio at update max_steps - 1: linearly, or as min_lr_ratio + (1 - min_lr_ratio) x (1 - sqrt(progress)),
  the "1-sqrt" cooldown of Hägele et al. 2024 (arXiv 2405.18392), which falls fast at first and flattens at the end.

The trainer multiplies each group's peak lr by this value before every update, so no scheduler state exists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .section import RecipeError, choice, integer, is_number, shown

KINDS = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")


@dataclass(frozen=True)
class Schedule:
    """The recipe's schedule section."""
    # Exactly one of max_steps / max_tokens; max_tokens is rounded up to whole steps.
    max_steps: int | None = None
    max_tokens: int | None = None
    # The lr multiplier over the run: cosine, or warmup-stable-decay with its decay over the last decay_fraction of
    # the updates, linear or 1-sqrt. Warmup and the floor are optim.warmup_steps and optim.min_lr_ratio, for both.
    kind: str = "cosine"
    decay_fraction: float = 0.2
    decay_shape: str = "linear"

    def check(self) -> None:
        if (self.max_steps is None) == (self.max_tokens is None):
            raise RecipeError("give exactly one of schedule.max_steps and schedule.max_tokens")
        for key in ("max_steps", "max_tokens"):
            if getattr(self, key) is not None:
                integer(f"schedule.{key}", getattr(self, key))
        choice("schedule.kind", self.kind, KINDS)
        choice("schedule.decay_shape", self.decay_shape, DECAY_SHAPES)
        if not (is_number(self.decay_fraction) and 0 < self.decay_fraction <= 1):
            raise RecipeError(f"schedule.decay_fraction must be a number in (0, 1], got {shown(self.decay_fraction)}")

    def check_shape(self, max_steps: int, warmup_steps: int) -> None:
        """The rule between this section and optim.warmup_steps, once the run's length is known."""
        if self.kind == "wsd":
            decay = decay_steps(max_steps, self.decay_fraction)
            if warmup_steps + decay > max_steps:
                raise RecipeError(f"schedule.kind wsd: the warmup ({warmup_steps} updates) and the decay "
                                  f"({decay} updates, decay_fraction {self.decay_fraction} of {max_steps}) overlap; "
                                  f"shorten optim.warmup_steps or schedule.decay_fraction")


def decay_steps(max_steps: int, decay_fraction: float) -> int:
    """How many of the last updates the wsd decay spans: decay_fraction of the run, at least one update."""
    return max(1, round(decay_fraction * max_steps))


def lr_multiplier(step: int, max_steps: int, warmup_steps: int, min_lr_ratio: float, kind: str = "cosine",
                  decay_fraction: float = 0.2, decay_shape: str = "linear") -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "cosine":
        peak = max(warmup_steps - 1, 0)
        span = max_steps - 1 - peak
        if span <= 0:
            return 1.0
        progress = min(1.0, (step - peak) / span)
        return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)
    if kind != "wsd":
        raise ValueError(f"unknown schedule kind {kind!r}")
    span = decay_steps(max_steps, decay_fraction)
    last_stable = max_steps - 1 - span  # the last update at the peak; the decay reaches its end at max_steps - 1
    if step <= last_stable:
        return 1.0
    progress = min(1.0, (step - last_stable) / span)
    fall = progress if decay_shape == "linear" else math.sqrt(progress)
    return 1.0 - fall * (1.0 - min_lr_ratio)


def learning_rate(step: int, max_lr: float, min_lr_ratio: float, warmup_steps: int, max_steps: int,
                  **shape) -> float:
    """The lr of a group whose peak is max_lr (shape: kind, decay_fraction, decay_shape of lr_multiplier)."""
    return max_lr * lr_multiplier(step, max_steps, warmup_steps, min_lr_ratio, **shape)
