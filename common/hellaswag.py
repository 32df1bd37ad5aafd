"""The one check of a HellaSwag validation file: `prep eval-data` runs it before installing a file, eval before
scoring one, so a bad document stops with one line naming the file and line instead of failing inside lm-eval.

A document needs what lm-eval's hellaswag task reads: text fields activity_label, ctx_a and ctx_b, `endings`
(a list of 4 strings) and `label` (0-3, as an integer or a string of one, as the Hub's copy stores it). Other
fields (ctx, ind, split, ...) are kept and not checked.
"""
from __future__ import annotations

import functools
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


def check_fits(path, block_size: int, limit: int | None = None) -> None:
    """Raise HellaSwagError naming the first doc of a checked file (file:line) with an ending that, as lm-eval
    scores it, does not fit a model of `block_size` tokens; only the first `limit` docs (those lm-eval's --limit
    scores) when given.

    lm-eval scores each ending as the continuation of the doc's context: a context too long is cut from the left
    (as lm-eval's hf backend does, and the pipeline's scorer too), but an ending longer than the model's context
    cannot be scored: the hf backend would cut it and score the wrong tokens, the pipeline's scorer would stop mid-
    evaluation. Eval calls this once it knows the model's block size, before scoring anything.
    """
    path = Path(path)
    st = path.stat()
    docs = _longest_endings(path.resolve(), st.st_size, st.st_mtime_ns)
    for lineno, ending, tokens in docs[:limit]:
        if tokens > block_size:
            raise HellaSwagError(f"{path}:{lineno}: ending {ending} is {tokens} tokens, longer than the model's "
                                 f"context (block_size {block_size}): it cannot be scored; remove that doc, or "
                                 f"evaluate a model with a longer context")


@functools.lru_cache(maxsize=4)
def _longest_endings(path: Path, size: int, mtime_ns: int) -> list[tuple[int, int, int]]:
    """Per doc of one version of a file, (line, ending, tokens) of its longest ending, counted as lm-eval counts a
    continuation: the tokens of context + " " + ending beyond those of the context. Cached: a watcher scoring many
    checkpoints counts once (about two seconds for the 10,042 validation docs)."""
    from lm_eval.tasks.hellaswag.utils import preprocess  # the task's own text cleaning, so the count cannot drift

    from .tokenizer import get_encoding
    enc = get_encoding()
    docs = []
    for lineno, doc in files.read_json_lines(path, HellaSwagError, append_only=False):
        query = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        context = len(enc.encode_ordinary(query))
        lengths = [len(enc.encode_ordinary(query + " " + preprocess(ending))) - context for ending in doc["endings"]]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        docs.append((lineno, longest, lengths[longest]))
    return docs
