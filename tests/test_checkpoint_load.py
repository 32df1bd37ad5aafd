"""train.rundir.consolidate.load_model on real DeepSpeed checkpoints of every ZeRO stage, bf16 and fp32.

One subprocess (`python -m tests.test_checkpoint_load OUT`, the __main__ block below) trains a small GPT for two
optimizer steps under each engine variant, saves a checkpoint the way train/ does (train.rundir.checkpoints.save, with
client_state param_names) and writes the live engine's fp32 weights beside it; the tests compare load_model's
weights with those.
"""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT
from train.rundir import RunDir
from train.rundir.checkpoints import CheckpointError, write_mark
from train.rundir.consolidate import load_model

# (ZeRO stage, precision); "bf16-fp32acc" is bf16 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer).
VARIANTS = [(0, "fp32"), (0, "bf16"), (1, "fp32"), (1, "bf16"), (1, "bf16-fp32acc"),
            (2, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16")]
# Small vocabulary keeps engine setup and checkpoint I/O to a fraction of a second per variant.
MODEL = dict(preset="tiny", vocab_size=512, block_size=32)
STEPS = 2


def variant_name(stage, precision):
    return f"zero{stage}-{precision}"


@pytest.fixture(scope="session")
def ds_runs(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("ds_runs")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, "-m", "tests.test_checkpoint_load", str(out)], cwd=repo_root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("stage,precision", VARIANTS, ids=[variant_name(*v) for v in VARIANTS])
def test_load_model_gives_live_fp32_weights(ds_runs, stage, precision):
    run = ds_runs / variant_name(stage, precision)
    expected = torch.load(run / "expected_fp32.pt", weights_only=True)
    model, meta = load_model(run)
    assert meta["kind"] == "deepspeed" and meta["tag"] == f"global_step{STEPS}"
    assert meta["step"] == STEPS and meta["tokens_seen"] == STEPS * 2 * 16 and meta["zero_stage"] == stage
    got = model.state_dict()
    assert set(expected) <= set(got)
    for name, value in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], value), f"{name}: max diff {(got[name] - value).abs().max()}"
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not model.training
    # bf16 runs must come back from the fp32 masters, which differ from the bf16 module copy.
    if precision != "fp32":
        assert meta["weights"].startswith("fp32 master")
    if precision == "bf16-fp32acc":
        assert "BF16_Optimizer" in meta["weights"]
    if (stage, precision) in [(0, "bf16"), (1, "bf16-fp32acc")]:  # the masters this module maps itself
        assert meta["weights"].endswith("by parameter name)"), meta


def test_every_path_form_finds_the_same_checkpoint(ds_runs):
    run = ds_runs / variant_name(1, "fp32")
    reference = load_model(run)[0].state_dict()
    for path in (run / "checkpoints", run / "checkpoints" / f"global_step{STEPS}"):
        model, meta = load_model(path)
        assert meta["tag"] == f"global_step{STEPS}"
        assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())


def test_hf_directory(tmp_path):
    model = GPT(GPTConfig.preset("tiny", vocab_size=512))
    model.save_hf(tmp_path / "hf")
    loaded, meta = load_model(tmp_path / "hf")
    assert meta["kind"] == "hf" and meta["step"] is None and meta["tag"] is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in loaded.state_dict().items())


def test_sample_from_a_training_run(ds_runs, capsys):
    """`python -m model sample RUN` goes through load_model; greedy output is the loaded model's own."""
    from common import tokenizer
    from model.__main__ import main
    run = ds_runs / variant_name(2, "bf16")
    prompt = "a b c"  # ids 64, 275, 269: inside this test model's 512-token vocabulary
    assert main(["sample", str(run), "--prompt", prompt, "--num", "1", "--max-new-tokens", "5",
                 "--top-k", "1"]) == 0
    out, err = capsys.readouterr()
    model, _ = load_model(run)
    expected = model.generate(torch.tensor([tokenizer.encode(prompt)]), 5, top_k=1)[0].tolist()
    assert out == f"--- sample 0 ---\n{tokenizer.decode(expected)}\n"
    assert f"step {STEPS}" in err


def copy_run(ds_runs, tmp_path, variant=(1, "bf16")):
    dst = tmp_path / "run"
    shutil.copytree(ds_runs / variant_name(*variant), dst)
    return dst, dst / "checkpoints" / f"global_step{STEPS}"


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_directory_that_is_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nor a run or checkpoints dir with a complete checkpoint"):
        load_model(tmp_path)


@pytest.mark.parametrize("variant,pattern", [((1, "bf16"), "*optim_states.pt"),
                                             ((3, "fp32"), "*model_states.pt")])
def test_partial_checkpoint(ds_runs, tmp_path, variant, pattern):
    run, tag = copy_run(ds_runs, tmp_path, variant)
    for f in tag.glob(pattern):
        f.unlink()
    with pytest.raises(CheckpointError, match="partial checkpoint"):
        load_model(run)


def test_checkpoint_without_model_config(ds_runs):
    with pytest.raises(CheckpointError, match="model_config"):
        load_model(ds_runs / "no-model-config")


def test_model_config_that_does_not_match_the_weights(ds_runs, tmp_path):
    run, tag = copy_run(ds_runs, tmp_path, (0, "fp32"))
    states_file = tag / "mp_rank_00_model_states.pt"
    states = torch.load(states_file, weights_only=False)
    states["model_config"]["n_embd"] = 256
    torch.save(states, states_file)
    write_mark(tag, STEPS, 1)  # a whole checkpoint, only its recorded shape is wrong
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(run)


def make_runs(out: Path) -> None:
    """Train and checkpoint every variant in this one process (world size 1, gloo on CPU)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from train.rundir.checkpoints import save
    deepspeed.init_distributed(dist_backend="gloo")
    config = GPTConfig.from_dict(MODEL)
    for stage, precision in VARIANTS:
        torch.manual_seed(stage)
        model = GPT(config)
        ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": stage}, "bf16": {"enabled": precision != "fp32"},
                     "steps_per_print": 10**9}
        if precision == "bf16-fp32acc":
            ds_config["data_types"] = {"grad_accum_dtype": "fp32"}
        # Two groups as train/ makes them (decayed matrices first), so optimizer order differs from module order.
        named = list(model.named_parameters())
        groups = [[(n, p) for n, p in named if p.dim() >= 2], [(n, p) for n, p in named if p.dim() < 2]]
        optimizer = torch.optim.AdamW([{"params": [p for _, p in group], "weight_decay": wd}
                                       for group, wd in zip(groups, (0.1, 0.0))], lr=1e-2)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        for _ in range(STEPS):
            x = torch.randint(0, config.vocab_size, (2, 16))
            _, loss = engine(x, x)
            engine.backward(loss)
            engine.step()
        run = out / variant_name(stage, precision)
        RunDir(run).start()
        client_state = {"model_config": config.to_dict(), "config": {"model": MODEL}, "step": STEPS,
                        "tokens_seen": STEPS * 2 * 16, "loader": {}, "rng": {}}
        save(engine, run / "checkpoints", STEPS, {**client_state, "param_names": [[n for n, _ in group]
                                                                                    for group in groups]}, 0, 1)
        if stage == 0 and precision != "fp32":
            # FP16_UnfusedOptimizer keeps the masters in the order the parameters were handed to it.
            names = [n for group in groups for n, _ in group]
            masters = [t for group in optimizer.fp32_groups for t in group]
            expected = dict(zip(names, masters))
        elif stage == 0:
            expected = dict(engine.module.named_parameters())
        else:
            expected = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
        torch.save({n: t.detach().float().clone() for n, t in expected.items()}, run / "expected_fp32.pt")
        if (stage, precision) == (0, "fp32"):
            RunDir(out / "no-model-config").start()
            engine.save_checkpoint(str(out / "no-model-config" / "checkpoints"), tag="global_step2",
                                   client_state={"step": STEPS})
            write_mark(out / "no-model-config" / "checkpoints" / "global_step2", STEPS, 1)


if __name__ == "__main__":
    make_runs(Path(sys.argv[1]))
