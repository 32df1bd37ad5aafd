"""`python -m model {info,plan,sample}`: inspect, size and sample GPT-2 models."""
from __future__ import annotations

import importlib
import sys

from common import cli

# Each command module exposes register(subparsers), which adds its parser and sets `run=<function(args)>`.
# The planner lives in train/ because it plans training runs (it reads a recipe with train's own loader), and is
# offered here because sizing a model for given GPUs is where a user looks for it.
COMMANDS = {"info": "model.info", "plan": "train.plan", "sample": "model.sample"}


def main(argv=None) -> int:
    parser = cli.Parser(prog="python -m model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        importlib.import_module(COMMANDS[name]).register(sub)
    return cli.run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
