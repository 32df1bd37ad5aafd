"""The one command-line style of every `python -m` entry point.

Exit status: 0 done; 1 an expected failure (common.errors.PipelineError, or an OSError that names its file, such
as a full disk), printed as one `error: ...` line; 2 a usage error; 130 interrupted; train adds 99 for "preempted,
checkpoint saved, requeue me". Any other exception is a bug and keeps its traceback. `--debug`, accepted by every
command, shows the traceback of an expected failure too.
"""
from __future__ import annotations

import argparse
import errno
import sys
import traceback

from .errors import PipelineError

INTERRUPTED_EXIT = 130
# The environment's faults, not the code's: expected even when the OSError names no file.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) and a --debug flag on every (sub)command."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's parser must not reset a --debug given before the subcommand.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an expected error too")

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_command(subparsers, name: str, run, help: str, **kwargs) -> Parser:
    """Add subcommand `name` to an entry point: its parser, on which run(args) is set. The one way every
    subcommand is registered (each module's register(subparsers) calls it)."""
    p = subparsers.add_parser(name, help=help, **kwargs)
    p.set_defaults(run=run)
    return p


def main_with_commands(prog: str, description: str, registers, argv=None) -> int:
    """The main() of an entry point with subcommands: each of `registers` is a register(subparsers) function."""
    parser = Parser(prog=prog, description=description)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in registers:
        register(subparsers)
    return run(parser, argv)


def table(rows, indent: str = "") -> str:
    """Key/value rows ((key, value) pairs or a dict) as two aligned columns: every command's summary table."""
    rows = list(rows.items()) if isinstance(rows, dict) else list(rows)
    width = max((len(key) for key, _ in rows), default=0)
    return "\n".join(f"{indent}{key:<{width}}  {value}" for key, value in rows)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def run(parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse argv and call args.run(args); map expected failures to one line and an exit status."""
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return args.run(args) or 0
    except PipelineError as exc:
        return fail(str(exc), exc.exit_code, debug)
    except OSError as exc:
        if exc.filename is None and exc.errno not in ENVIRONMENT_ERRNOS:  # likely a bug: keep the traceback
            raise
        return fail(describe_os_error(exc), 1, debug)
    except KeyboardInterrupt:
        return fail("interrupted; rerun the same command to resume", INTERRUPTED_EXIT, debug)


def describe_os_error(exc: OSError) -> str:
    if exc.filename is None:
        return str(exc.strerror or exc)
    where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    return f"{where}: {exc.strerror or exc}"


def fail(message: str, code: int, debug: bool = False) -> int:
    if debug:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return code
