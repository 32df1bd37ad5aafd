"""`python -m model {info,plan,sample}`: inspect, size and sample GPT-2 models."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each command module exposes register(subparsers), which adds its parser and sets `run=<function(args)>`.
COMMANDS = ("info", "plan", "sample")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name in COMMANDS:
        importlib.import_module(f"model.{name}").register(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError, RuntimeError) as exc:  # the model package's errors all derive from these
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
