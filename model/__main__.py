"""`python -m model {info,plan,sample}`: inspect, size and sample GPT-2 models."""
from __future__ import annotations

import argparse
import importlib
import sys

from .tokenizer import TokenizerUnavailable

# Each command module exposes register(subparsers), which adds its parser and sets `run=<function(args)>`.
COMMANDS = ("info", "plan", "sample")


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes end in one `error: ...` line and exit status 2, like every other failure (C8)."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    parser = OneLineErrorParser(prog="python -m model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        importlib.import_module(f"model.{name}").register(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError, TokenizerUnavailable) as exc:  # the model package's expected errors
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
