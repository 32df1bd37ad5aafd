"""The one base class of expected failures.

An expected failure is the user's input or environment, not a bug: a bad flag, a malformed file, a refused
operation, a full disk. Every `python -m` entry point prints it as one `error: ...` line and exits with its
exit_code (see common.cli); anything else keeps its traceback.
"""
from __future__ import annotations


class PipelineError(Exception):
    """An expected failure; the message names the file, line or step and says what to do."""
    exit_code = 1


class UsageError(PipelineError):
    """A flag or argument value that cannot work: exit 2, as argparse does for malformed flags."""
    exit_code = 2
