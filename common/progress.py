"""One place that makes prep's progress bars: on stderr, and sparse when stderr is a log file (Slurm)."""
from __future__ import annotations

import sys


def bar(**kwargs):
    from tqdm import tqdm
    interactive = sys.stderr.isatty()
    return tqdm(file=sys.stderr, dynamic_ncols=interactive, mininterval=0.5 if interactive else 30.0, **kwargs)
