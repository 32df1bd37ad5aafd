"""The GPT-2 BPE (tiktoken "gpt2"): the one tokenizer every stage uses."""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

from .errors import PipelineError

EOT_TOKEN = 50256
N_VOCAB = 50257
ENCODING_NAME = "gpt2"
# The files tiktoken's "gpt2" encoding is built from; its cache names them by the sha1 of the URL.
_BPE_URLS = {
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
}


class TokenizerUnavailable(PipelineError):
    pass


def _cache_dir() -> Path:
    # The same lookup order tiktoken uses.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return Path(os.environ["TIKTOKEN_CACHE_DIR"])
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return Path(os.environ["DATA_GYM_CACHE_DIR"])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


@functools.cache
def get_encoding():
    """tiktoken's GPT-2 encoding; offline it needs the BPE files in TIKTOKEN_CACHE_DIR."""
    import tiktoken
    try:
        enc = tiktoken.get_encoding(ENCODING_NAME)
    except Exception as exc:  # tiktoken raises requests/urllib errors of several kinds when offline
        raise TokenizerUnavailable(
            f"cannot load the GPT-2 BPE: it is not in tiktoken's cache {_cache_dir()} and downloading it failed "
            f"({type(exc).__name__}). Fix: on a machine with internet run `TIKTOKEN_CACHE_DIR=DIR python -c "
            f"\"import tiktoken; tiktoken.get_encoding('gpt2')\"`, then make DIR readable here and set "
            f"TIKTOKEN_CACHE_DIR=DIR") from None
    assert enc.eot_token == EOT_TOKEN and enc.n_vocab == N_VOCAB
    return enc


def encode(text: str) -> list[int]:
    """Plain-text tokens; '<|endoftext|>' inside a document is text, not the EOT token."""
    return get_encoding().encode_ordinary(text)


def decode(tokens) -> str:
    return get_encoding().decode(list(tokens))


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Paths of (encoder.json, vocab.bpe) in tiktoken's cache: the same files HF calls vocab.json / merges.txt."""
    get_encoding()
    paths = tuple(_cache_dir() / hashlib.sha1(url.encode()).hexdigest() for url in _BPE_URLS.values())
    for name, p in zip(_BPE_URLS, paths):
        if not p.exists():
            raise TokenizerUnavailable(f"GPT-2 {name} is not in tiktoken's cache ({p}); set TIKTOKEN_CACHE_DIR")
    return paths  # type: ignore[return-value]
