"""`python -m model {info,plan,sample}`: inspect, size and sample GPT-2 models."""
from __future__ import annotations

import importlib
import sys

from common import cli

# Each command module exposes register(subparsers), which adds its parser and sets `run=<function(args)>`.
COMMANDS = ("info", "plan", "sample")


def main(argv=None) -> int:
    parser = cli.Parser(prog="python -m model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        importlib.import_module(f"model.{name}").register(sub)
    return cli.run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
