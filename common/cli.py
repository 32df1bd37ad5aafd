"""The one command-line style of every `python -m` entry point.

Exit status: 0 done; 1 an expected failure (common.errors.PipelineError, or an OSError that names its file, such
as a full disk), printed as one `error: ...` line; 2 a usage error; 130 interrupted; 141 the reader of its output
went away (`| head`), quietly; train adds 99 for "preempted, checkpoint saved, requeue me". Any other exception is a bug and keeps its traceback. `--debug`, accepted by every
command, shows the traceback of an expected failure too.
"""
from __future__ import annotations

import argparse
import copy
import decimal
import errno
import math
import os
import re
import sys
import traceback
from pathlib import Path

from .errors import PipelineError

INTERRUPTED_EXIT = 130
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE
# The environment's faults, not the code's: expected even when the OSError names no file.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as every command shows it: descriptions as written, and each flag's default unless its help already
    says what the default is."""

    @staticmethod
    def _adds_default(action) -> bool:
        default = action.default
        return not ("default" in (action.help or "") or not action.option_strings or default is None
                    or default is False or default is argparse.SUPPRESS or default == [])

    def _format_action(self, action):
        if not action.help and self._adds_default(action):  # argparse prints no help line for a flag without help
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        return f"{action.help} (default: %(default)s)" if self._adds_default(action) else action.help


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), defaults in --help and a --debug flag on every (sub)command."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
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


def invoked_as(prog: str) -> str:
    """The command's name as the user typed it: a console script's own (gpt2-prep), else `prog` (python -m prep)."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if script.startswith("gpt2-") else prog


def main_with_commands(prog: str, description: str, registers, argv=None) -> int:
    """The main() of an entry point with subcommands: each of `registers` is a register(subparsers) function."""
    parser = Parser(prog=invoked_as(prog), description=description)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in registers:
        register(subparsers)
    return run(parser, argv)


def table(rows, indent: str = "") -> str:
    """Key/value rows ((key, value) pairs or a dict) as two aligned columns: every command's summary table."""
    rows = list(rows.items()) if isinstance(rows, dict) else list(rows)
    width = max((len(key) for key, _ in rows), default=0)
    return "\n".join(f"{indent}{key:<{width}}  {value}" for key, value in rows)


# A whole number as people write counts: 100M, 10B, 2K, 1e8, 1.5M, 1_000; 64Mi for bytes. B is billions (as in
# "10B tokens"), G the same; K, M, T decimal; Ki, Mi, Gi, Ti binary.
NUMBER = re.compile(r"\s*([0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?)\s*([KMGT]i|[KMGBT])?\s*", re.IGNORECASE)
SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12,
         "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_int(text: str) -> int:
    """'100M', '10B', '2K', '1e8', '1_000', '64Mi' -> the exact integer; ValueError saying why for anything else,
    a fraction included ('1.5' tokens), never a rounded guess. The one parser of every count."""
    shown = text.strip() if len(text.strip()) <= 40 else text.strip()[:40] + "..."  # errors stay one short line
    match = NUMBER.fullmatch(text)
    if not match:
        raise ValueError(f"expected a whole number such as 100M, 10B, 2K, 1e8 or 1_000, got {shown!r}")
    value = decimal.Decimal(match.group(1).replace("_", ""))
    if value.adjusted() > 30:  # before scaling and int(), which would build a number as long as the exponent
        raise ValueError(f"{shown} is too large for a count")
    value *= SCALE[(match.group(2) or "").lower()]
    if value != value.to_integral_value():
        exact = f"{value.normalize():f}"
        said = shown if exact == text.strip() or len(exact) > 40 else f"{shown} ({exact})"
        raise ValueError(f"{said} is not a whole number: a count has no fraction")
    return int(value)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = parse_int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
    return value


def count(text: str) -> int:
    """argparse type: a whole number >= 0, as parse_int reads it (100M, 1e8, 2K, 1_000)."""
    return _int_at_least(text, 0)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1, as parse_int reads it."""
    return _int_at_least(text, 1)


def at_most(high: int, what: str):
    """argparse type: a whole number from 1 to high (what: the unit, named in the refusal)."""
    def parse(text: str) -> int:
        value = positive_int(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"at most {high:,} ({what}), got {value:,}")
        return value
    return parse


def existing_path(text: str) -> Path:
    """argparse type: a file or directory that exists. Naming one that does not is a usage error (exit 2), as is
    every command-line value that names nothing (docs/design.md, "Exit status")."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return path


def preset_or_file(presets):
    """argparse type: one of `presets`' names, or an existing file (a YAML file of the same keys)."""
    def check(text: str) -> str:
        if text not in presets and not Path(text).is_file():
            raise argparse.ArgumentTypeError(f"{text!r} is neither a preset ({', '.join(presets)}) nor a file")
        return text
    return check


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


# time.sleep refuses much beyond this (OverflowError), and a watcher that looks less than daily at a training run
# is one nobody would wait for; eval watch's --poll and a pipeline file's EVAL_POLL share the bound.
MAX_POLL_SECONDS = 86400


def poll_seconds(text: str) -> float:
    """argparse type: seconds between two looks, > 0 and at most MAX_POLL_SECONDS."""
    value = positive_float(text)
    if value > MAX_POLL_SECONDS:
        raise argparse.ArgumentTypeError(f"at most {MAX_POLL_SECONDS} seconds (a day), got {text}")
    return value


def run(parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse argv and call args.run(args); map expected failures to one line and an exit status, which it returns
    (a usage error's 2 too, so that main(argv) called in-process always returns the status)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's exit after --help (0) or a usage error (2), its line already printed
        return exc.code
    debug = getattr(args, "debug", False)
    try:
        status = args.run(args) or 0
        sys.stdout.flush()  # here, not at exit: a closed pipe is then the BrokenPipeError below
        return status
    except BrokenPipeError:
        return closed_pipe()
    except PipelineError as exc:
        return fail(str(exc), exc.exit_code, debug)
    except OSError as exc:
        if exc.filename is None and exc.errno not in ENVIRONMENT_ERRNOS:  # likely a bug: keep the traceback
            raise
        return fail(describe_os_error(exc), 1, debug)
    except KeyboardInterrupt:
        return fail("interrupted; rerun the same command to resume", INTERRUPTED_EXIT, debug)


def closed_pipe() -> int:
    """The reader of stdout went away (`python -m model plan | head -1`): stop quietly, with the status of a process
    killed by SIGPIPE, as a C tool would. stdout goes to /dev/null first, so the interpreter's final flush of what
    is still buffered does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE_EXIT


def describe_os_error(exc: OSError) -> str:
    if exc.filename is None:
        return str(exc.strerror or exc)
    where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    return f"{where}: {exc.strerror or exc}"


def say_line(text: str, stream=None) -> None:
    """One line in one write: the ranks of a training share one stderr pipe, and print's separate write of the
    newline lets another rank's line land between a line and its end."""
    stream = sys.stderr if stream is None else stream
    stream.write(text + "\n")
    stream.flush()


def fail(message: str, code: int, debug: bool = False) -> int:
    if debug:
        traceback.print_exc()
    say_line(f"error: {message}")
    return code
