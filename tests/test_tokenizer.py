"""model.tokenizer: tiktoken's GPT-2 BPE, from TIKTOKEN_CACHE_DIR, with a fix-it error when it cannot load."""
import os
import subprocess
import sys
from pathlib import Path

import tiktoken

from common import tokenizer

SAMPLES = ["Hello, I'm a language model,", "", "  leading spaces\n\n\ttabs", "naïve café 東京 🙂",
           "a<|endoftext|>b", "1234567890 3.14159 -x"]


def test_encode_decode_match_tiktoken(shared_dir):
    reference = tiktoken.get_encoding("gpt2")
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text()[:20000]
    for sample in SAMPLES + [text]:
        ids = tokenizer.encode(sample)
        assert ids == reference.encode_ordinary(sample)
        assert tokenizer.decode(ids) == sample


def test_gpt2_constants():
    enc = tokenizer.get_encoding()
    assert enc.name == "gpt2" and enc.n_vocab == tokenizer.N_VOCAB == 50257
    assert enc.eot_token == tokenizer.EOT_TOKEN == 50256
    assert tokenizer.decode([tokenizer.EOT_TOKEN]) == "<|endoftext|>"


def test_endoftext_inside_a_document_is_text():
    assert tokenizer.EOT_TOKEN not in tokenizer.encode("one<|endoftext|>two")


def test_bpe_files_come_from_tiktoken_cache_dir():
    encoder_json, vocab_bpe = tokenizer.gpt2_bpe_files()
    assert encoder_json.parent == vocab_bpe.parent == Path(os.environ["TIKTOKEN_CACHE_DIR"])
    assert vocab_bpe.read_text(encoding="utf-8").startswith("#version")


def test_unloadable_tokenizer_gives_a_fix_it_error(tmp_path, repo_root):
    """An empty cache and no way out (the proxy refuses at once): one `error:` line saying how to fix it."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path),
           "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "model", "sample", "--preset", "tiny", "--prompt", "hi",
                           "--num", "1", "--max-new-tokens", "1"],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: cannot load the GPT-2 BPE")
    assert "TIKTOKEN_CACHE_DIR=DIR" in line and str(tmp_path) in line
    assert not list(tmp_path.iterdir())
