"""The one base class of expected failures.

An expected failure is the user's input or environment, not a bug: a bad flag, a malformed file, a refused
operation, a full disk. Every `python -m` entry point prints it as one `error: ...` line and exits with its
exit_code (see common.cli); anything else keeps its traceback.
"""
from __future__ import annotations

import reprlib


class PipelineError(Exception):
    """An expected failure; the message names the file, line or step and says what to do."""
    exit_code = 1


class UsageError(PipelineError):
    """A flag or argument value that cannot work: exit 2, as argparse does for malformed flags."""
    exit_code = 2


SHOWN = 80  # characters of a value an error quotes

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 6, 6, 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = SHOWN


def shown(value) -> str:
    """repr(value) of at most SHOWN characters (+ "..."), so an error stays one short line; reprlib never walks
    more of a big or deeply nested value than it prints."""
    if isinstance(value, str) and len(value) > SHOWN:
        return repr(value[:SHOWN]) + "..."
    text = _REPR.repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."
