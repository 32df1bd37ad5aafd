"""`python -m model plan`: exact parameter counts, DeepSpeed's own ZeRO estimators, measured activations,
and one-line errors for runs that cannot exist."""
import contextlib
import io
import json
import re
import subprocess
import sys

import pytest
import torch

from model.__main__ import main
from model.config import GPTConfig
from model.flops import flops_per_token
from model.gpt import GPT
from train.plan import (
    GiB,
    activation_bytes,
    count_params,
    cpu_bytes_per_node,
    largest_layer_params,
    model_state_bytes,
)

EXACT_PARAMS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                "gpt2-xl": 1_557_611_200}


def plan_json(*argv) -> dict:
    """Run the CLI in this process (the same main() `python -m model` runs) and parse its --json."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", *argv, "--json"]) == 0
    return json.loads(out.getvalue())


# --- parameters, FLOPs, time: the numbers a user plans with ------------------------------------------

@pytest.mark.parametrize("preset", EXACT_PARAMS)
def test_params_equal_model_info_totals(preset):
    assert count_params(GPTConfig.preset(preset)) == (EXACT_PARAMS[preset], EXACT_PARAMS[preset])


def test_params_of_a_custom_padded_shape_match_the_built_model():
    config = GPTConfig(n_layer=3, n_head=2, n_embd=64, vocab_size=1000, padded_vocab_size=1024, block_size=32)
    model = GPT(config)
    assert count_params(config) == (model.num_params(), model.num_params(include_padding=True))
    assert count_params(config)[1] - count_params(config)[0] == 24 * 64


def test_cli_json_for_gpt2_on_8_h100_at_10b_tokens():
    result = subprocess.run(
        [sys.executable, "-m", "model", "plan", "--model", "gpt2", "--gpus", "8", "--gpu", "h100", "--zero", "1",
         "--micro-batch", "16", "--seq-len", "1024", "--tokens", "10B", "--price-per-gpu-hour", "2.5", "--json"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    for key in ("params", "flops", "chinchilla_tokens", "memory_per_gpu", "fits", "max_micro_batch", "hours",
                "gpu_hours", "cost"):
        assert key in plan, key
    mem = plan["memory_per_gpu"]
    assert set(mem) == {"weights", "gradients", "optimizer", "activations", "buffers", "total"}
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert plan["params"] == 124_439_808
    # 6 * (12 L C^2 + V C) + 12 L C T, by hand: 741,192,192 + 113,246,208 FLOPs per token.
    assert plan["flops"] == pytest.approx(10e9 * 854_438_400)
    assert plan["chinchilla_tokens"] == 20 * 124_439_808
    assert plan["chinchilla_ratio"] == pytest.approx(10e9 / (20 * 124_439_808))
    assert plan["hours"] == pytest.approx(plan["flops"] / (8 * 989e12 * 0.4) / 3600)
    assert plan["gpu_hours"] == pytest.approx(8 * plan["hours"])
    assert plan["cost"] == pytest.approx(2.5 * plan["gpu_hours"])
    assert plan["fits"] and plan["max_micro_batch"] >= 16


def test_table_output_shows_formula_and_verdict(capsys):
    assert main(["plan", "--model", "gpt2-xl", "--gpus", "1", "--gpu-memory-gb", "24", "--zero", "0",
                 "--micro-batch", "8", "--steps", "100", "--batch-tokens", "8192"]) == 0
    out = capsys.readouterr().out
    assert "6 * N_matmul + 12 * n_layer * n_embd * seq_len" in out
    assert "DOES NOT FIT" in out and "largest micro batch that fits: 0" in out  # 20 bytes x 1.56B > 24 GiB


def test_largest_micro_batch_is_the_boundary():
    plan = plan_json("--model", "gpt2-medium", "--gpu", "a100-40gb", "--zero", "0", "--micro-batch", "1")
    best = plan["max_micro_batch"]
    assert best > 1
    assert plan_json("--model", "gpt2-medium", "--gpu", "a100-40gb", "--zero", "0",
                     "--micro-batch", str(best))["fits"]
    assert not plan_json("--model", "gpt2-medium", "--gpu", "a100-40gb", "--zero", "0",
                         "--micro-batch", str(best + 1))["fits"]


def test_steps_budget_custom_gpu_and_recipe_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run_dir: runs/x\nmodel: {preset: gpt2, n_layer: 6}\n")
    plan = plan_json("--model", str(recipe), "--gpus", "16", "--gpus-per-node", "4", "--gpu", "mi300x",
                     "--gpu-memory-gb", "192", "--gpu-tflops", "1307", "--steps", "1000", "--batch-tokens", "524288",
                     "--micro-batch", "8", "--mfu", "0.5")
    assert plan["model"]["n_layer"] == 6 and plan["tokens"] == 524_288_000
    assert plan["gpu"]["memory_bytes"] == 192 * GiB and plan["gpu"]["peak_bf16_flops"] == 1307e12
    assert plan["hours"] == pytest.approx(plan["tokens"] * flops_per_token(GPTConfig.preset("gpt2", n_layer=6), 1024)
                                          / (16 * 1307e12 * 0.5) / 3600)
    assert plan["cost"] is None


def test_zero_stages_and_offload_move_memory_where_deepspeed_puts_it():
    totals = []
    for zero in range(4):
        gpu = plan_json("--model", "gpt2-xl", "--gpus", "8", "--zero", str(zero))["memory_per_gpu"]
        totals.append(gpu["weights"] + gpu["gradients"] + gpu["optimizer"])
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    offloaded = plan_json("--model", "gpt2-xl", "--gpus", "8", "--zero", "3", "--offload", "--offload-params")
    assert offloaded["memory_per_gpu"]["optimizer"] == 0
    assert offloaded["cpu_memory_per_node"]["offloaded_states"] == 18 * 1_557_611_200
    assert offloaded["deepspeed"]["overlap_comm"]  # DeepSpeed's stage-3 default
    checkpointed = plan_json("--model", "gpt2-xl", "--micro-batch", "8", "--activation-checkpointing")
    assert checkpointed["memory_per_gpu"]["activations"] < \
        plan_json("--model", "gpt2-xl", "--micro-batch", "8")["memory_per_gpu"]["activations"] / 2


def test_the_repository_deepspeed_configs_are_read(repo_root):
    n = EXACT_PARAMS["gpt2"]
    zero1 = plan_json("--model", "gpt2", "--gpus", "8", "--deepspeed", str(repo_root / "configs/deepspeed/zero1.json"))
    assert zero1["zero"] == 1 and zero1["deepspeed"]["fp32_grad_accum"]  # BF16_Optimizer: full fp32 gradients
    assert zero1["memory_per_gpu"]["gradients"] == 2 * n + 4 * n
    assert zero1["memory_per_gpu"]["optimizer"] == 12 * n // 8
    zero2 = plan_json("--model", "gpt2", "--gpus", "8", "--deepspeed", str(repo_root / "configs/deepspeed/zero2.json"))
    assert zero2["memory_detail"]["deepspeed_buckets"] == 2 * 2 * 50_000_000  # two bf16 buckets (overlap_comm)
    offload = plan_json("--model", "gpt2", "--gpus", "8",
                        "--deepspeed", str(repo_root / "configs/deepspeed/zero3-offload.json"))
    assert offload["zero"] == 3 and offload["offload"] and offload["offload_params"]
    assert plan_json("--model", "gpt2", "--gpus", "8", "--zero", "2", "--deepspeed",
                     str(repo_root / "configs/deepspeed/zero3.json"))["zero"] == 2  # a flag overrides the file


def test_a_deepspeed_file_with_exponent_numbers_reads_as_train_reads_it(tmp_path):
    # JSON's 5e7 is a number; YAML 1.1 alone reads it as the string "5e7" (the one YAML rule, common.yamlfile).
    ds = tmp_path / "zero2.json"
    ds.write_text('{"zero_optimization": {"stage": 2, "overlap_comm": true, "reduce_bucket_size": 5e7}}')
    plan = plan_json("--model", "gpt2", "--gpus", "8", "--deepspeed", str(ds))
    assert plan["memory_detail"]["deepspeed_buckets"] == 2 * 2 * 50_000_000


def test_a_training_recipe_supplies_model_deepspeed_and_batch(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)  # the recipe names its DeepSpeed config relative to the checkout
    recipe = str(repo_root / "configs/train/gpt2-124m-edu10B.yaml")
    plan = plan_json("--recipe", recipe, "--gpus", "8")
    assert (plan["micro_batch"], plan["seq_len"], plan["grad_accum_steps"], plan["steps"]) == (64, 1024, 1, 19073)
    assert plan["tokens"] == 19073 * 524288 and plan["zero"] == 1 and plan["deepspeed"]["fp32_grad_accum"]
    assert plan["params"] == 124_439_808 and plan["params_in_memory"] == 124_439_808 + (50304 - 50257) * 768
    overridden = plan_json("--recipe", recipe, "--gpus", "8", "--micro-batch", "32", "--tokens", "1B")
    # --tokens with a recipe is its schedule.max_tokens, which train rounds up to whole steps of 524,288 tokens.
    assert overridden["grad_accum_steps"] == 2 and overridden["steps"] == 1908
    assert overridden["tokens"] == 1908 * 524288 >= 10**9
    assert not plan["activation_checkpointing"]
    recomputing = plan_json("--recipe", str(repo_root / "configs/train/gpt2-350m.yaml"), "--gpus", "8")
    assert not recomputing["activation_checkpointing"] and recomputing["fits"]  # the recipe's own setting is planned
    assert recomputing["micro_batch"] == 64


# --- model states against DeepSpeed's own estimators -------------------------------------------------

ESTIMATE_LINE = re.compile(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*?)\s*$")


def deepspeed_table(estimator, **kwargs) -> list[tuple[float, float, dict]]:
    """Call a DeepSpeed *_all_cold estimator and parse its printed (CPU GiB, GPU GiB, options) rows."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimator(**kwargs)
    rows = []
    for line in out.getvalue().splitlines():
        if match := ESTIMATE_LINE.match(line):
            options = dict(kv.split("=") for kv in match.group(3).replace(" ", "").split(","))
            rows.append((float(match.group(1)) * GiB, float(match.group(2)) * GiB, options))
    assert rows, out.getvalue()
    return rows


def close(ours: float, theirs: float) -> bool:
    """Within 5%, plus the 0.005 GiB the estimator's two-decimal print can hide."""
    return abs(ours - theirs) <= 0.05 * theirs + 0.005 * GiB


CASES = [("gpt2", 1, 1), ("gpt2-xl", 8, 1), ("gpt2-large", 32, 4)]  # (preset, GPUs in all, nodes)


@pytest.mark.parametrize("preset,gpus,nodes", CASES)
def test_zero2_model_states_match_deepspeed(preset, gpus, nodes):
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_cold,
    )
    n = EXACT_PARAMS[preset]
    per_node = gpus // nodes
    rows = deepspeed_table(estimate_zero2_model_states_mem_needs_all_cold, total_params=n,
                           num_gpus_per_node=per_node, num_nodes=nodes)
    assert len(rows) == 2
    for cpu, gpu, options in rows:
        offload = options["offload_optimizer"] != "none"
        states = model_state_bytes(n, largest_layer_params(GPTConfig.preset(preset)), 2, gpus, offload)
        ours_gpu = sum(states["gpu"].values())
        assert close(ours_gpu, gpu), (options, ours_gpu / GiB, gpu / GiB)
        _, exact_gpu = estimate_zero2_model_states_mem_needs(n, per_node, nodes, cpu_offload=offload)
        assert abs(ours_gpu - exact_gpu) <= 0.05 * exact_gpu
        if nodes == 1:  # DeepSpeed scales the offload CPU term by all GPUs, not a node's: compare on one node
            ours_cpu = cpu_bytes_per_node(n, states["cpu_per_rank"], per_node)["total"]
            assert close(ours_cpu, cpu), (options, ours_cpu / GiB, cpu / GiB)


@pytest.mark.parametrize("preset,gpus,nodes", CASES)
def test_zero3_model_states_match_deepspeed(preset, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )
    n, largest = EXACT_PARAMS[preset], largest_layer_params(GPTConfig.preset(preset))
    per_node = gpus // nodes
    rows = deepspeed_table(estimate_zero3_model_states_mem_needs_all_cold, total_params=n,
                           largest_layer_params=largest, num_gpus_per_node=per_node, num_nodes=nodes)
    assert len(rows) == 6
    for cpu, gpu, options in rows:
        offload, offload_params = options["offload_optimizer"] != "none", options["offload_param"] != "none"
        states = model_state_bytes(n, largest, 3, gpus, offload, offload_params)
        ours_gpu = sum(states["gpu"].values())
        assert close(ours_gpu, gpu), (options, ours_gpu / GiB, gpu / GiB)
        _, exact_gpu, _ = estimate_zero3_model_states_mem_needs(n, largest, per_node, nodes, offload,
                                                                offload_params, zero_init=False)
        assert abs(ours_gpu - exact_gpu) <= 0.05 * exact_gpu
        if options["zero_init"] == "0":  # train/ builds the model on the CPU, without deepspeed.zero.Init
            ours_cpu = cpu_bytes_per_node(n, states["cpu_per_rank"], per_node)["total"]
            assert close(ours_cpu, cpu), (options, ours_cpu / GiB, cpu / GiB)


@pytest.mark.parametrize("shape", [dict(n_layer=2, n_head=4, n_embd=128, vocab_size=50257, padded_vocab_size=50304),
                                   dict(n_layer=2, n_head=4, n_embd=128, vocab_size=64)])
def test_largest_layer_and_total_as_deepspeed_counts_them(shape):
    from deepspeed.runtime.zero.stage3 import model_to_params
    config = GPTConfig(block_size=64, **shape)
    assert model_to_params(GPT(config)) == (count_params(config)[1], largest_layer_params(config))


# --- activations against what the real model saves for backward --------------------------------------

def saved_for_backward_bytes(config: GPTConfig, micro_batch: int, seq_len: int, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd keeps during one forward of the bf16 model (weights aside)."""
    torch.manual_seed(0)
    model = GPT(config).to(torch.bfloat16).train()
    model.activation_checkpointing = checkpointing  # what train sets from the recipe
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    idx = torch.randint(0, config.vocab_size, (micro_batch, seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(idx[:, :-1], idx[:, 1:])
    assert loss.requires_grad
    return sum(saved.values())


@pytest.mark.parametrize("micro_batch,seq_len", [(1, 256), (4, 64)])
def test_tiny_activation_estimate_within_25_percent_of_measured(micro_batch, seq_len):
    config = GPTConfig.preset("tiny")
    measured = saved_for_backward_bytes(config, micro_batch, seq_len, checkpointing=False)
    estimate = activation_bytes(config, micro_batch, seq_len, checkpointing=False)["saved"]
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_per_block_activation_formula_when_blocks_dominate(checkpointing):
    # A small vocabulary so the per-layer terms, not the logits, make up the total.
    config = GPTConfig(n_layer=6, n_head=4, n_embd=256, vocab_size=256, block_size=128)
    measured = saved_for_backward_bytes(config, 4, 128, checkpointing)
    estimate = activation_bytes(config, 4, 128, checkpointing)["saved"]
    assert abs(estimate - measured) <= 0.05 * measured, (estimate, measured)  # the tensor list is exact


# --- bad input: one line, non-zero exit --------------------------------------------------------------

BAD = {
    "impossible shape": (["--model", "gpt2", "--n-head", "7"], "not divisible"),
    "zero layers": (["--n-layer", "0"], "n_layer must be a positive integer"),
    "zero GPUs": (["--gpus", "0"], "--gpus must be at least 1"),
    "unknown GPU": (["--gpu", "tpu-v5"], "unknown GPU kind"),
    "unknown GPU, memory only": (["--gpu", "tpu-v5", "--gpu-memory-gb", "16"], "--gpu-tflops"),
    "micro batch 0": (["--micro-batch", "0"], "--micro-batch must be positive"),
    "seq len 0": (["--seq-len", "0"], "--seq-len must be positive"),
    "seq len > block": (["--model", "tiny", "--seq-len", "512"], "exceeds the model's block_size 256"),
    "unknown model": (["--model", "gpt5"], "'gpt5' is neither a preset (gpt2, gpt2-medium"),
    "offload at stage 0": (["--zero", "0", "--offload"], "offload needs ZeRO stage 1, 2 or 3"),
    "fp32 accumulation at stage 2": (["--zero", "2", "--grad-accum-dtype", "fp32"], "ZeRO-1 without offload"),
    "missing DeepSpeed config": (["--deepspeed", "/nonexistent/ds.json"], "cannot read DeepSpeed config"),
    "missing recipe": (["--recipe", "/nonexistent/recipe.yaml"], "training recipe: cannot read /nonexistent"),
    "batch not a multiple": (["--micro-batch", "3", "--batch-tokens", "524288"], "not a positive multiple"),
    "steps without batch": (["--steps", "10"], "--steps needs --batch-tokens"),
    "zero tokens": (["--tokens", "0"], "--tokens must be positive"),
    "recipe key unknown": (["--recipe", "configs/train/tiny-cpu.yaml", "--set", "optim.lr=1"],
                           "unknown recipe key 'optim.lr'"),
    "--set without a recipe": (["--set", "batch.micro_batch=2"], "--set changes a recipe key: it needs --recipe"),
    "GPU memory beyond arithmetic": (["--gpu-memory-gb", "1e308", "--gpu-tflops", "100"],
                                     "--gpu-memory-gb must be positive and at most 1,000,000, got 1e+308"),
    "GPU peak not a number": (["--gpu-memory-gb", "80", "--gpu-tflops", "nan"], "--gpu-tflops must be positive"),
    "price not a number": (["--price-per-gpu-hour", "nan"], "--price-per-gpu-hour must be a finite number >= 0"),
    "GPUs beyond any cluster": (["--gpus", "1e30", "--gpus-per-node", "8"], "--gpus must be at most 1,000,000"),
    "recipe batch on too many GPUs": (["--recipe", "configs/train/gpt2-124m-edu10B.yaml", "--gpus", "16"],
                                      "batch.total_tokens 524288 is not a multiple of micro_batch 64 x seq_len 1024 "
                                      "x world_size 16"),  # train's own message: the same check
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_error(case, capsys, monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)  # recipes name their DeepSpeed config relative to the checkout, as train/ reads it
    argv, fragment = BAD[case]
    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], captured.err


def test_bad_input_exit_status_from_the_real_entry_point():
    result = subprocess.run([sys.executable, "-m", "model", "plan", "--gpus", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --gpus must be at least 1, got 0"




@pytest.mark.parametrize("ds_config,fragment", [
    ('{"zero_optimization": {"stage": 5}}', "ZeRO stage must be 0-3, got 5"),
    ('{"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}', "not a number"),
    ('[1, 2]', "is not a DeepSpeed config"),
    ('{"zero_optimization": ', "cannot read DeepSpeed config"),
    ('{"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}', "offload needs ZeRO"),
])
def test_bad_deepspeed_config_is_one_line_error(ds_config, fragment, tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(ds_config)
    assert main(["plan", "--deepspeed", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
