"""The paths a recipe names, made absolute before the trainer uses or saves them.

A recipe's paths (run_dir, deepspeed, init_from, data.dir, data.mix[i].dir) are read relative to the directory
`python -m train` starts in, as a shell user expects. The trainer makes them absolute at start-up, so what it
saves (RUN/config.yaml, each checkpoint's client state) names the same files from any directory:
`python -m train --config RUN/config.yaml` resumes the run wherever it is started. A run directory that is moved
is resumed with `--set run_dir=NEW` (its saved run_dir still names the old place; run_dir is never compared on
resume).
"""
from __future__ import annotations

import dataclasses
import os


def absolute_path(path: str | None) -> str | None:
    """`~` expanded, made absolute against the working directory; symlinks are kept as the user wrote them."""
    if path is None:
        return None
    return os.path.abspath(os.path.expanduser(path))


def absolute(recipe):
    """The recipe (train.recipe.Recipe) with every path key absolute."""
    data = recipe.data
    data = dataclasses.replace(
        data, dir=absolute_path(data.dir),
        mix=tuple(dataclasses.replace(entry, dir=absolute_path(entry.dir)) for entry in data.mix))
    changes = {"run_dir": absolute_path(recipe.run_dir), "deepspeed": absolute_path(recipe.deepspeed), "data": data}
    if getattr(recipe, "init_from", None) is not None:
        changes["init_from"] = absolute_path(recipe.init_from)
    return dataclasses.replace(recipe, **changes)
