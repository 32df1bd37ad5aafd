"""What every section of the training recipe shares: its error, the REQUIRED marker and the value checks.

Each section is a frozen dataclass defined beside the code that uses it (train.data.Data, train.optim.Optim,
train.schedule.Schedule, model.config.GPTConfig, the small ones in train.recipe) and validates itself with
these checks; train.recipe assembles them. An error names the dotted key and quotes at most a short prefix of
the value, so a multi-megabyte value never reaches the terminal.
"""
from __future__ import annotations

import math

from common.errors import UsageError, shown


class RecipeError(UsageError):
    """A recipe that cannot run; the message names the key and the problem (exit 2, like a bad flag)."""


REQUIRED = "<required>"

# Integers a recipe holds (steps, counts, token totals) stay below 2^53: they are written into JSON lines and read
# back by tools that keep numbers as doubles, and no run comes near (2^53 tokens is ~10^6 x GPT-2's 10B).
MAX_INT = 2 ** 53
# Seeds feed numpy's and torch's generators, which take up to 64 bits; 2^63 - 1 keeps them a signed int64.
MAX_SEED = 2 ** 63 - 1
def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(key: str, value, low: int = 1, high: int = MAX_INT) -> int:
    """value is an integer in [low, high]; the error says positive / non-negative for the usual lows."""
    if not is_int(value) or not low <= value <= high:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer >= {low}")
        raise RecipeError(f"{key} must be {what}" + (f" (at most {high:,})" if is_int(value) and value > high else "")
                          + f", got {shown(value)}")
    return value


def number(key: str, value, low: float = 0.0, high: float = math.inf, what: str = "a non-negative number") -> float:
    if not is_number(value) or not low <= value <= high:
        raise RecipeError(f"{key} must be {what}, got {shown(value)}")
    return value


def boolean(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{key} must be true or false, got {shown(value)}")
    return value


def string(key: str, value, nonempty: bool = False) -> str:
    if not isinstance(value, str) or (nonempty and not value):
        raise RecipeError(f"{key} must be a {'non-empty ' if nonempty else ''}string, got {shown(value)}")
    return value


def choice(key: str, value, choices: tuple) -> str:
    if value not in choices or not isinstance(value, str):
        raise RecipeError(f"{key} must be {' or '.join(choices)}, got {shown(value)}")
    return value
