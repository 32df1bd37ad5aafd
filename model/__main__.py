"""`python -m model {info,plan,sample}`: inspect, size and sample GPT-2 models."""
from __future__ import annotations

import sys

from common import cli
from train import plan

from . import info, sample


def main(argv=None) -> int:
    # The planner lives in train/ because it plans training runs (it reads a recipe with train's own loader), and
    # is offered here because sizing a model for given GPUs is where a user looks for it.
    return cli.main_with_commands("python -m model", __doc__, (info.register, plan.register, sample.register), argv)


if __name__ == "__main__":
    sys.exit(main())
