"""Learning rate: linear warmup to max_lr, then cosine down to min_lr_ratio * max_lr at the last step.

`step` is the 0-based index of the optimizer update about to be taken (as in build-nanogpt's get_lr): update 0 uses
max_lr / warmup_steps, update warmup_steps - 1 uses max_lr, and update max_steps - 1 ends the cosine at min_lr.
The trainer writes this value into every optimizer param group before each update, so no scheduler state exists.
"""
from __future__ import annotations

import math


def learning_rate(step: int, max_lr: float, min_lr_ratio: float, warmup_steps: int, max_steps: int) -> float:
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    peak = max(warmup_steps - 1, 0)
    span = max_steps - 1 - peak
    if span <= 0:
        return max_lr
    progress = min(1.0, (step - peak) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
