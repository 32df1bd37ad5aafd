"""One HellaSwag check (common.hellaswag) for `prep eval-data --from` and for eval, before any scoring."""
import json

import pytest

from common import hellaswag
from prep.__main__ import main as prep_main

GOOD = {"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he", "ctx": "A man mixes flour. he",
        "endings": ["bakes.", "sings.", "runs.", "sleeps."], "label": "0"}

BAD = [
    pytest.param(json.dumps({**GOOD, "endings": ["bakes.", 7, "runs.", "sleeps."]}).encode(),
                 "ending 1 must be a string, got int 7", id="non-string-ending"),
    pytest.param(json.dumps({**GOOD, "endings": ["a", "b", "c", "d"], "label": 1.5}).encode(),
                 "label 1.5 is not an integer", id="float-label"),
    pytest.param(json.dumps({**GOOD, "label": "two"}).encode(), "label 'two' is not an integer", id="word-label"),
    pytest.param(json.dumps({**GOOD, "label": True}).encode(), "label True is not an integer", id="bool-label"),
    pytest.param(json.dumps({**GOOD, "label": 4}).encode(), "label 4 is out of range 0-3", id="label-range"),
    pytest.param(json.dumps({**GOOD, "ctx_b": None}).encode(), "'ctx_b' must be a string", id="null-context"),
    pytest.param(json.dumps(GOOD).encode().replace(b"flour", b"fl\xffur"), "invalid UTF-8 at byte", id="bad-utf8"),
    pytest.param(json.dumps(GOOD).encode().replace(b"bakes", b"\\ud83dbakes"), "ending 0 holds a lone UTF-16 "
                 "surrogate escape", id="lone-surrogate"),
]


def write_bad(tmp_path, line: bytes):
    path = tmp_path / "hellaswag_bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + line + b"\n")  # the bad doc on line 3
    return path


@pytest.mark.parametrize("line,expected", BAD)
def test_prep_eval_data_refuses_a_bad_doc_naming_file_and_line(tmp_path, capsys, line, expected):
    path = write_bad(tmp_path, line)
    assert prep_main(["eval-data", "--out", str(tmp_path / "eval"), "--from", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:3: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "eval" / "hellaswag_val.jsonl").exists()


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A real (untrained, tiny) model exported as a Hugging Face directory."""
    from model.config import GPTConfig
    from model.gpt import GPT
    out = tmp_path_factory.mktemp("tiny_hf") / "hf"
    GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=16)).save_hf(out)
    return out


@pytest.mark.parametrize("line,expected", BAD)
def test_eval_checkpoint_refuses_a_bad_doc_before_scoring(tmp_path, capsys, tiny_hf_dir, line, expected):
    from eval.__main__ import main as eval_main
    path = write_bad(tmp_path, line)
    out = tmp_path / "result.json"
    rc = eval_main(["checkpoint", str(tiny_hf_dir), "--hellaswag-file", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"error: {path}:3: ") and expected in err and err.count("\n") == 1, err
    assert not out.exists()


def test_the_shared_validation_file_passes(shared_dir):
    assert hellaswag.check_file(shared_dir / "data" / "hellaswag_val.jsonl") == 10042
