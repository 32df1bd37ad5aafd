"""`python -m model info` and `python -m model sample`, and their one-line errors on bad input.

Most cases call the CLI's main(argv) in this process (same parser, same error handling, no interpreter start-up);
two run the real `python -m model` end to end (tests/test_tokenizer.py runs a third, failing one).
"""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import tokenizer
from model.__main__ import main
from model.config import GPTConfig
from model.gpt import GPT

TOTALS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
PROMPT = "Hello, I'm a language model,"


def run_cli(repo_root, *args):
    return subprocess.run([sys.executable, "-m", "model", *args], cwd=repo_root, capture_output=True, text=True,
                          timeout=300)


def cli(capsys, *args):
    """(exit status, stdout, stderr) of main(args); usage errors exit through SystemExit."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_info_table_for_gpt2(repo_root):
    proc = run_cli(repo_root, "info", "--model", "gpt2")
    assert proc.returncode == 0, proc.stderr
    for name in ("token embedding (wte)", "position embedding (wpe)", "attention (c_attn, c_proj)",
                 "MLP (c_fc, c_proj)", "layernorms (ln_1, ln_2)", "final layernorm (ln_f)", "LM head (tied to wte)"):
        assert name in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].split()[:2] == ["total", "124,439,808"]


@pytest.mark.parametrize("preset", TOTALS)
def test_info_json_totals(capsys, preset):
    code, out, _ = cli(capsys, "info", "--model", preset, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["total"] == TOTALS[preset]
    assert report["config"] == GPTConfig.preset(preset).to_dict()


def test_info_from_yaml_and_recipe(capsys, tmp_path):
    (tmp_path / "recipe.yaml").write_text("run_dir: runs/x\nmodel:\n  preset: tiny\n  padded_vocab_size: 50304\n")
    code, out, _ = cli(capsys, "info", "--model", str(tmp_path / "recipe.yaml"), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["config"]["padded_vocab_size"] == 50304 and report["config"]["n_layer"] == 2
    assert report["total"] == GPT(GPTConfig.preset("tiny")).num_params()
    assert report["padding"] == 47 * 128


def test_sample_preset_is_deterministic(capsys):
    args = ("sample", "--preset", "tiny", "--prompt", PROMPT, "--num", "3", "--max-new-tokens", "6")
    first = cli(capsys, *args, "--seed", "42")
    again = cli(capsys, *args, "--seed", "42")
    other = cli(capsys, *args, "--seed", "43")
    assert first[0] == 0 and first[1] == again[1] != other[1]
    samples = first[1].split("--- sample ")[1:]
    assert len(samples) == 3 and all(PROMPT in s for s in samples)
    assert "parameters: 6,862,464" in first[2]


def test_sample_num_is_bounded_and_generated_a_batch_at_a_time(capsys):
    # --num 100000 allocated 20 GB in one batch: now refused, and a large --num runs in batches of BATCH rows.
    from model.sample import BATCH
    status, out, err = cli(capsys, "sample", "--preset", "tiny", "--num", "100000")
    assert status == 2 and err.count("\n") == 1 and "at most 10,000 (samples per command), got 100,000" in err
    status, out, err = cli(capsys, "sample", "--preset", "tiny", "--num", str(BATCH + 2), "--max-new-tokens", "2",
                           "--seed", "7")
    assert status == 0 and out.count("--- sample ") == BATCH + 2 and f"--- sample {BATCH + 1} ---" in out


def test_sample_real_cli(repo_root):
    proc = run_cli(repo_root, "sample", "--preset", "tiny", "--prompt", PROMPT, "--num", "2",
                   "--max-new-tokens", "8", "--seed", "42")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- sample") == 2 and proc.stdout.count(PROMPT) == 2


def test_sample_hf_dir_greedy_matches_the_model(capsys, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny")).eval()
    model.save_hf(tmp_path / "hf")
    code, out, _ = cli(capsys, "sample", str(tmp_path / "hf"), "--prompt", PROMPT, "--num", "1",
                       "--max-new-tokens", "10", "--top-k", "1")
    assert code == 0
    idx = torch.tensor([tokenizer.encode(PROMPT)])
    expected = tokenizer.decode(model.generate(idx, 10, top_k=1)[0].tolist())
    assert out == f"--- sample 0 ---\n{expected}\n"


@pytest.fixture()
def yaml_model(tmp_path):
    def write(text):
        path = tmp_path / "model.yaml"
        path.write_text(text)
        return str(path)
    return write


@pytest.mark.parametrize("text,message", [
    ("preset: gpt2\nn_layers: 6\n", "unknown model config key(s): 'n_layers'"),
    ("preset: gpt5\n", "unknown model preset 'gpt5'"),
    ("n_layer: 2\nn_head: 3\nn_embd: 64\n", "n_embd (64) is not divisible by n_head (3)"),
])
def test_info_bad_model_config(capsys, yaml_model, text, message):
    path = yaml_model(text)
    code, out, err = cli(capsys, "info", "--model", path)
    assert code == 1 and out == ""
    assert one_error_line(err).startswith(f"error: {path}: ")  # names the file
    assert message in one_error_line(err)


def test_unknown_preset(capsys):
    """The same mistake, the same status: a preset that does not exist is a usage error for info and sample."""
    code, _, err = cli(capsys, "info", "--model", "gpt5")
    assert code == 2 and "'gpt5' is neither a preset" in one_error_line(err)
    code, _, err = cli(capsys, "sample", "--preset", "gpt5")
    assert code == 2 and "invalid choice: 'gpt5'" in one_error_line(err)


def test_prompt_longer_than_block_size(capsys):
    code, out, err = cli(capsys, "sample", "--preset", "tiny", "--prompt", " word" * 300, "--num", "1")
    assert code == 1 and out == ""
    assert "prompt is 300 tokens, longer than the model's block_size 256" in one_error_line(err)


def test_unusable_device(capsys):
    code, _, err = cli(capsys, "sample", "--preset", "tiny", "--device", "cuda:99", "--prompt", "hi")
    assert code == 2 and "--device cuda:99 is not usable here" in one_error_line(err)


@pytest.mark.parametrize("flags, needle", [
    (["--seed", str(2**64)], "argument --seed: must be from -2^63 to 2^64 - 1, got 18446744073709551616"),
    (["--device", "meta"], "--device meta cannot sample: "),  # holds tensors, so the device check passes it
])
def test_a_seed_torch_refuses_or_a_device_without_a_generator_is_a_usage_error(capsys, flags, needle):
    code, out, err = cli(capsys, "sample", "--preset", "tiny", "--prompt", "hi", "--num", "1", *flags)
    assert code == 2 and out == "" and needle in one_error_line(err)


def test_sample_needs_a_source(capsys):
    code, _, err = cli(capsys, "sample", "--prompt", "hi")
    assert code == 2 and "CKPT_OR_HF_DIR" in one_error_line(err)


def test_hf_dir_with_mismatched_shapes(capsys, tmp_path):
    GPT(GPTConfig.preset("tiny")).save_hf(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    state["transformer.h.1.mlp.c_fc.weight"] = state["transformer.h.1.mlp.c_fc.weight"][:, :100].contiguous()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    code, out, err = cli(capsys, "sample", str(tmp_path / "hf"), "--prompt", "hi", "--num", "1")
    assert code == 1 and out == ""
    assert "transformer.h.1.mlp.c_fc.weight has shape (100, 128), expected (512, 128)" in one_error_line(err)


def test_hf_dir_with_unreadable_weights_is_one_line_naming_the_file(capsys, tmp_path):
    GPT(GPTConfig.preset("tiny")).save_hf(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    code, out, err = cli(capsys, "sample", str(tmp_path / "hf"), "--prompt", "hi", "--num", "1")
    assert code == 1 and out == ""
    assert one_error_line(err).startswith(f"error: {weights}: cannot read its weights (SafetensorError: ")


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = cli(capsys, "sample", str(tmp_path / "nope"), "--prompt", "hi")
    assert code == 2 and "nope: no such file or directory" in one_error_line(err)
