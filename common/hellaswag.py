"""The one check of a HellaSwag validation file: `prep eval-data` runs it before installing a file, eval before
scoring one, so a bad document stops with one line naming the file and line instead of failing inside lm-eval.

A document needs what lm-eval's hellaswag task reads: text fields activity_label, ctx_a and ctx_b, `endings`
(a list of 4 strings) and `label` (0-3, as an integer or a string of one, as the Hub's copy stores it). Other
fields (ctx, ind, split, ...) are kept and not checked.
"""
from __future__ import annotations

from pathlib import Path

from . import files
from .errors import PipelineError

TEXT_FIELDS = ("activity_label", "ctx_a", "ctx_b")
REQUIRED = (*TEXT_FIELDS, "endings", "label")
N_ENDINGS = 4


class HellaSwagError(PipelineError):
    """A document or file that is not HellaSwag validation data; the message names the file and line."""


def check_doc(doc, where: str) -> None:
    """Raise HellaSwagError (prefixed with `where`) unless `doc` is a scoreable HellaSwag document."""
    if not isinstance(doc, dict):
        raise HellaSwagError(f"{where}: not a HellaSwag doc (a JSON object with {', '.join(REQUIRED)})")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise HellaSwagError(f"{where}: not a HellaSwag doc, missing {', '.join(missing)}")
    for key in TEXT_FIELDS:
        _check_text(doc[key], where, repr(key))
    endings = doc["endings"]
    if not isinstance(endings, list) or len(endings) != N_ENDINGS:
        got = f"{len(endings)} item(s)" if isinstance(endings, list) else type(endings).__name__
        raise HellaSwagError(f"{where}: 'endings' must be a list of {N_ENDINGS} strings, got {got}")
    for i, ending in enumerate(endings):
        _check_text(ending, where, f"ending {i}")
    label = doc["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)) or (
            isinstance(label, str) and not (label.isascii() and label.isdigit())):
        raise HellaSwagError(f"{where}: label {label!r} is not an integer")
    if not 0 <= int(label) < N_ENDINGS:
        raise HellaSwagError(f"{where}: label {int(label)} is out of range 0-{N_ENDINGS - 1}")


def _check_text(value, where: str, what: str) -> None:
    if not isinstance(value, str):
        raise HellaSwagError(f"{where}: {what} must be a string, got {type(value).__name__} {value!r:.40}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud83d"): the tokenizer cannot encode it
        raise HellaSwagError(f"{where}: {what} holds a lone UTF-16 surrogate escape, not text") from None


def check_file(path) -> int:
    """Check every non-blank line of a jsonl file; returns the number of documents."""
    path = Path(path)
    n = 0
    for lineno, doc in files.read_json_lines(path, HellaSwagError, append_only=False):
        check_doc(doc, f"{path}:{lineno}")
        n += 1
    if n == 0:
        raise HellaSwagError(f"HellaSwag file {path} holds no docs")
    return n
