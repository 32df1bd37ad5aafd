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


def test_an_ending_longer_than_the_models_context_is_refused_naming_the_doc(tmp_path, shared_dir):
    """lm-eval truncates a too-long context (and so does eval); an ending that alone exceeds block_size cannot be
    scored: refused by the check eval runs with the model's block size, naming file, line and ending."""
    long_ending = " ".join(["word"] * 300)
    path = tmp_path / "hellaswag_long.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "endings": ["bakes.", long_ending, "a", "b"]})
                    + "\n")
    assert hellaswag.check_file(path) == 2  # the file itself is well formed
    hellaswag.check_fits(path, 301)  # the ending is " word" x 300: 300 tokens
    with pytest.raises(hellaswag.HellaSwagError) as err:
        hellaswag.check_fits(path, 299)
    assert str(err.value) == (f"{path}:2: ending 1 is 300 tokens, longer than the model's context (block_size 299): "
                              f"it cannot be scored; remove that doc, or evaluate a model with a longer context")
    # A long context with short endings is scored as lm-eval scores it (the context cut from the left): accepted.
    path.write_text(json.dumps({**GOOD, "ctx_a": long_ending}) + "\n")
    hellaswag.check_fits(path, 64)
    # The real validation set: its longest ending (line 9226) is 87 tokens; a --limit checks only the docs it scores.
    real = shared_dir / "data" / "hellaswag_val.jsonl"
    hellaswag.check_fits(real, 87)
    with pytest.raises(hellaswag.HellaSwagError, match=r"hellaswag_val.jsonl:9226: ending 0 is 87 tokens"):
        hellaswag.check_fits(real, 86)
    hellaswag.check_fits(real, 24, limit=8)
    with pytest.raises(hellaswag.HellaSwagError, match=r"hellaswag_val.jsonl:9: ending 0 is 34 tokens"):
        hellaswag.check_fits(real, 24, limit=9)


def test_eval_checkpoint_refuses_an_ending_longer_than_the_model_in_one_line(tmp_path, capsys, tiny_hf_dir):
    from eval.__main__ import main as eval_main
    path = tmp_path / "hellaswag_long.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "endings": ["a", " ".join(["word"] * 100), "b", "c"]})
                    + "\n")
    out = tmp_path / "result.json"
    rc = eval_main(["checkpoint", str(tiny_hf_dir), "--hellaswag-file", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: {path}:2: ending 1 is 100 tokens, longer than the model's context (block_size 64): it cannot be "
        f"scored; remove that doc, or evaluate a model with a longer context"), err
    assert not out.exists()
    # With --limit 1 only the first doc is scored, and it fits.
    assert eval_main(["checkpoint", str(tiny_hf_dir), "--hellaswag-file", str(path), "--out", str(out),
                      "--limit", "1"]) == 0
