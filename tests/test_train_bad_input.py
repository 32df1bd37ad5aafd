"""Bad input to `python -m train`: one `error:` line, non-zero exit, nothing in the run dir written or overwritten."""
import json
import os
import shutil

import torch

from tests.fixtures_run import run_train, train_command
from train.rundir.checkpoints import read_client_state


def assert_one_line_error(result, rc, *needles):
    assert result.returncode == rc, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for needle in needles:
        assert needle in last, last


def test_dataset_without_manifest(tmp_path, tiny_dataset):
    broken = tmp_path / "ds"
    shutil.copytree(tiny_dataset, broken)
    (broken / "manifest.json").unlink()
    result = run_train(train_command(tmp_path / "run", broken), check_rc=None)
    assert_one_line_error(result, 1, "no manifest.json", str(broken))
    assert not (tmp_path / "run").exists()


def test_vocab_and_block_size_mismatch(tmp_path, tiny_dataset):
    result = run_train(train_command(tmp_path / "run", tiny_dataset, "model.vocab_size=50000"), check_rc=None)
    assert_one_line_error(result, 1, "vocabulary 50257", "vocab_size is 50000")
    result = run_train(train_command(tmp_path / "run", tiny_dataset, "batch.seq_len=512"), check_rc=None)
    assert_one_line_error(result, 2, "batch.seq_len (512) exceeds the model's block_size (256)")
    result = run_train(train_command(tmp_path / "run", tiny_dataset, "optim.max_lr_typo=1"), check_rc=None)
    assert_one_line_error(result, 2, "unknown recipe key 'optim.max_lr_typo'")
    result = run_train(train_command(tmp_path / "run", tiny_dataset, "batch.total_tokens=100"), check_rc=None)
    assert_one_line_error(result, 2, "not a multiple of micro_batch 2 x seq_len 32 x world_size 1 = 64")
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_shape_is_refused_untouched(tmp_path, tiny_run, tiny_dataset):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", run_dir / "checkpoints")
    shutil.copy(tiny_run / "format.json", run_dir / "format.json")
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    result = run_train(train_command(run_dir, tiny_dataset, "model.n_layer=3"), check_rc=None)
    assert_one_line_error(result, 1, "another shape", "n_layer: checkpoint 2 vs recipe 3")
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "format.json"]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dataset):
    # The largest lr and weight decay a recipe takes: each update scales the decayed weights by 1 - 10 x 10 = -99,
    # so they overflow within a few updates and a later loss is not finite. ZeRO-0's bare torch optimizer applies
    # the overflowed update; ZeRO-1's wrapper drops every update with non-finite gradients itself, so the loss
    # there stays finite and this stop is never reached. The loss turns non-finite at about update 6, the suite's
    # usual max_steps: the cosine's decay slows the growth, so a long schedule keeps the rate (and the stop) sure.
    run_dir = tmp_path / "run"
    result = run_train(train_command(run_dir, tiny_dataset, "deepspeed=configs/deepspeed/zero0.json",
                                     "schedule.max_steps=40", "optim.max_lr=10", "optim.weight_decay=10",
                                     "optim.warmup_steps=0", "checkpoint.every=1", "eval.every=0", "sample.every=0"),
                       check_rc=None)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss is ") and "stopped before it" in last, last
    bad_step = int(last.split(" (after step ")[1].split(")")[0])  # the last good step
    assert bad_step >= 1
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"global_step{bad_step}"
    assert read_client_state(ckpts / f"global_step{bad_step}")["step"] == bad_step
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "skipped" not in r] == list(range(1, bad_step + 1))
    # ZeRO-0 keeps the optimizer state beside the weights.
    optim = torch.load(ckpts / f"global_step{bad_step}" / "mp_rank_00_model_states.pt", weights_only=False)
    assert optim["optimizer"]["state"]  # the saved optimizer state is there


def test_an_optimizer_value_past_its_bound_or_a_set_list_that_is_not_yaml_is_refused_before_anything_is_written(
        tmp_path, tiny_dataset):
    # optim.max_lr=1e300 trained, skipped five non-finite updates and stopped with exit 1, leaving a run directory.
    for value, needle in (("optim.max_lr=1e300", "optim.max_lr must be a non-negative number, at most 10, "
                                                 "got 1e+300"),
                          ("optim.grad_clip=1e9", "optim.grad_clip must be a non-negative number (0: no clipping), "
                                                  "at most 100"),
                          ("batch={micro_batch: 2, micro_batch: 4}", "--set 'batch={micro_batch: 2, micro_batch: "
                                                                     "4}': not valid YAML (the key 'micro_batch' "
                                                                     "twice in one mapping)")):
        result = run_train(train_command(tmp_path / "run", tiny_dataset, value), check_rc=None)
        assert_one_line_error(result, 2, needle)
        assert not (tmp_path / "run").exists()


def test_compile_with_zero3_is_refused_before_anything_is_written(tmp_path, tiny_dataset):
    result = run_train(train_command(tmp_path / "run", tiny_dataset, "compile=true",
                                     "deepspeed=configs/deepspeed/zero3.json"), check_rc=None)
    assert_one_line_error(result, 2, "compile: true with ZeRO stage 3", "zero3.json")
    result = run_train(train_command(tmp_path / "run", tiny_dataset, "activation_checkpointing=sometimes"),
                       check_rc=None)
    assert_one_line_error(result, 2, "activation_checkpointing must be true or false, got 'sometimes'")
    assert not (tmp_path / "run").exists()


def broken_compilers_env(tmp_path, *names: str) -> dict:
    """os.environ with each named compiler a script that exits 1, first on PATH, CXX unset, and a fresh inductor
    cache (so that kernels must really be built)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in names:
        (fake / name).write_text("#!/bin/sh\nexit 1\n")
        (fake / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env.update(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    return env


def test_a_failing_compiler_stops_with_one_line_before_any_update(tmp_path, tiny_dataset):
    # A broken `g++`: inductor's compiler. (Not c++ or CXX: DeepSpeed's CPU comm op needs that one, see below.)
    env = broken_compilers_env(tmp_path, "g++")
    run_dir = tmp_path / "run"
    result = run_train(train_command(run_dir, tiny_dataset, "compile=true"), check_rc=None, env=env)
    assert_one_line_error(result, 1, "torch.compile failed in update 1", "C++ compiler", "set compile: false")
    metrics = run_dir / "metrics.jsonl"  # created at the first record, or empty
    assert not (run_dir / "checkpoints").exists() and (not metrics.exists() or not metrics.read_text())


def test_muon_without_a_working_compiler_stops_with_one_line_before_any_update(tmp_path, tiny_dataset):
    # DeepSpeed 0.19.8 torch.compiles Muon's update whatever `compile` says: a broken `g++` (inductor's
    # compiler, as above).
    env = broken_compilers_env(tmp_path, "g++")
    muon = ["optim.name=muon", "optim.grad_clip=0", "schedule.max_steps=2", "eval.every=0", "sample.every=0"]
    run_dir = tmp_path / "run"
    result = run_train(train_command(run_dir, tiny_dataset, *muon), check_rc=None, env=env)
    assert_one_line_error(result, 1, "optim.name muon", "torch.compile", "C++ compiler", "TORCHDYNAMO_DISABLE=1",
                          "optim.name adamw")
    assert not run_dir.exists()  # stopped before the engine, so before anything of the run is written
    # The way out the line offers: the same run, uncompiled, trains.
    run_train(train_command(run_dir, tiny_dataset, *muon), env=dict(env, TORCHDYNAMO_DISABLE="1"))
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_cpu_run_without_a_working_cpp_compiler_is_one_line(tmp_path, tiny_dataset):
    # On CPU DeepSpeed builds (or re-checks) its shared-memory communication op with c++ whenever it makes a
    # process group: a machine without a compiler (a fresh one running the demo) got torch's cpp_extension traceback.
    env = broken_compilers_env(tmp_path, "c++", "g++", "gcc", "cc")
    run_dir = tmp_path / "run"
    result = run_train(train_command(run_dir, tiny_dataset, "eval.every=0", "sample.every=0"), check_rc=None, env=env)
    assert_one_line_error(result, 1, "training on CPU needs a C++ compiler", "apt-get install g++", "c++")
    assert not run_dir.exists()


def test_a_deepspeed_json_with_an_unknown_stage_or_a_section_not_an_object_is_one_line(tmp_path, tiny_dataset):
    # These reached DeepSpeed's own validation (a pydantic traceback) or a .get on an int, after train.lock.
    cases = [({"zero_optimization": {"stage": 7}}, "fp32", "zero_optimization.stage must be 0, 1, 2 or 3, got 7"),
             ({"zero_optimization": {"stage": True}}, "fp32", "zero_optimization.stage must be 0, 1, 2 or 3"),
             ({"zero_optimization": 3}, "fp32", "zero_optimization must be a JSON object, got 3"),
             ({"bf16": 1}, "bf16", "bf16 must be a JSON object, got 1")]
    for i, (ds, precision, needle) in enumerate(cases):
        path = tmp_path / f"ds{i}.json"
        path.write_text(json.dumps(ds))
        result = run_train(train_command(tmp_path / "run", tiny_dataset, f"deepspeed={path}",
                                         f"precision={precision}"), check_rc=None)
        assert_one_line_error(result, 2, str(path), needle)
        assert not (tmp_path / "run").exists()


def test_a_run_dir_that_is_the_dataset_is_refused_and_the_dataset_left_alone(tmp_path, tiny_dataset):
    dataset = tmp_path / "ds"
    shutil.copytree(tiny_dataset, dataset)
    before = sorted(p.name for p in dataset.iterdir())
    result = run_train(train_command(dataset, dataset), check_rc=None)
    assert_one_line_error(result, 2, f"run_dir {dataset} is a prepared dataset")
    assert sorted(p.name for p in dataset.iterdir()) == before
