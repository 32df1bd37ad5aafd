"""train/ pieces that need no DeepSpeed engine: recipe validation, batch arithmetic, schedule, loader, launch env."""
import json
import math

import pytest

from prep.reader import Dataset
from tests.conftest import REPO
from train.recipe import Mfu, RecipeError, batch_plan, deepspeed_config, load, parse_overrides
from train.data import TrainLoader, val_batches, window_counts
from train.launch import resolve_env
from train.schedule import learning_rate

TINY = REPO / "configs/train/tiny-cpu.yaml"
RECIPES = sorted((REPO / "configs/train").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates_and_divides(path):
    recipe = load(path)
    plan = batch_plan(recipe, world_size=1)
    ds = deepspeed_config(recipe, plan)
    assert ds["train_batch_size"] * recipe.batch.seq_len == recipe.batch.total_tokens
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] == (recipe.precision == "bf16")


def test_gpt2_124m_recipe_is_build_nanogpt():
    r = load(REPO / "configs/train/gpt2-124m-edu10B.yaml")
    plan = batch_plan(r, world_size=8)
    assert (plan.grad_accum, plan.max_steps, r.optim.warmup_steps) == (1, 19073, 715)
    assert r.optim.max_lr * r.optim.min_lr_ratio == pytest.approx(6e-5)
    assert batch_plan(r, world_size=1).grad_accum == 8


def test_deepspeed_files_bf16_overlap_clipping():
    for path in sorted((REPO / "configs/deepspeed").glob("*.json")):
        cfg = json.loads(path.read_text())
        assert cfg["bf16"]["enabled"] is True, path
        assert "overlap_comm" in cfg["zero_optimization"], path
    # fp32 gradient accumulation is where DeepSpeed 0.19 supports it with bf16: ZeRO-1's BF16_Optimizer.
    assert json.loads((REPO / "configs/deepspeed/zero1.json").read_text())["data_types"]["grad_accum_dtype"] == "fp32"


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe key 'optim.lr'"):
        load(TINY, ["optim.lr=1"])
    with pytest.raises(RecipeError, match="unknown recipe key 'bogus'"):
        load(TINY, ["bogus=1"])
    with pytest.raises(RecipeError, match="model: unknown model config key"):
        load(TINY, ["model.n_layers=3"])
    with pytest.raises(RecipeError, match="exceeds the model's block_size"):
        load(TINY, ["batch.seq_len=512"])
    with pytest.raises(RecipeError, match="exactly one of schedule.max_steps"):
        load(TINY, ["schedule.max_tokens=1000"])
    bad = tmp_path / "r.yaml"
    bad.write_text("run_dir: x\n")
    with pytest.raises(RecipeError, match="required"):
        load(bad)


def test_compile_and_activation_checkpointing_are_booleans_off_by_default():
    r = load(TINY)
    assert r.compile is False and r.activation_checkpointing is False
    r = load(TINY, ["compile=true", "activation_checkpointing=true"])
    assert r.compile is True and r.activation_checkpointing is True
    deepspeed_config(r, batch_plan(r, 1))  # ZeRO-1 (the recipe's): compile allowed
    with pytest.raises(RecipeError, match="compile must be true or false, got 1"):
        load(TINY, ["compile=1"])
    r = load(TINY, ["compile=true", "deepspeed=configs/deepspeed/zero3-offload.json"])
    with pytest.raises(RecipeError, match=r"compile: true with ZeRO stage 3 \(configs/deepspeed/zero3-offload.json\)"):
        deepspeed_config(r, batch_plan(r, 1))
    r = load(TINY, ["activation_checkpointing=true", "deepspeed=configs/deepspeed/zero3.json"])
    assert deepspeed_config(r, batch_plan(r, 1))["zero_optimization"]["stage"] == 3  # checkpointing: any stage


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=null", "e=text"]) == {"a": {"b": 3, "c": [1, 2]}, "d": None,
                                                                            "e": "text"}
    assert parse_overrides(["lr=1e-3", "big=3e30"]) == {"lr": 0.001, "big": 3e30}  # YAML 1.1 would say strings
    r = load(TINY, ["optim.betas=[0.8, 0.9]", "schedule.max_steps=7"])
    assert r.optim.betas == (0.8, 0.9) and r.schedule.max_steps == 7


def test_batch_that_does_not_divide_shows_the_arithmetic():
    r = load(TINY, ["batch.total_tokens=1000"])
    with pytest.raises(RecipeError) as err:
        batch_plan(r, world_size=3)
    assert "1000 is not a multiple of micro_batch 2 x seq_len 64 x world_size 3 = 384" in str(err.value)


def test_deepspeed_file_may_not_contradict_the_recipe(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 99, "zero_optimization": {"stage": 1}}))
    r = load(TINY, [f"deepspeed={ds}"])
    with pytest.raises(RecipeError, match="train_micro_batch_size_per_gpu=99 but the recipe gives 2"):
        deepspeed_config(r, batch_plan(r, 1))


def test_schedule_warmup_then_cosine_to_min():
    kw = dict(max_lr=6e-4, min_lr_ratio=0.1, warmup_steps=715, max_steps=19073)
    assert learning_rate(0, **kw) == pytest.approx(6e-4 / 715)
    assert learning_rate(1, **kw) == pytest.approx(2 * 6e-4 / 715)
    assert learning_rate(714, **kw) == pytest.approx(6e-4)
    assert learning_rate(19072, **kw) == pytest.approx(6e-5)
    mid = (714 + 19072) / 2
    assert learning_rate(int(mid), **kw) == pytest.approx(3.3e-4, rel=1e-3)
    lrs = [learning_rate(s, **kw) for s in range(714, 19073, 97)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(0, max_lr=1.0, min_lr_ratio=0.0, warmup_steps=0, max_steps=1) == 1.0


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return Dataset(tiny_dataset)


def test_loader_ranks_read_disjoint_windows_and_epochs_reshuffle(dataset):
    T, B = 32, 4
    total = sum(window_counts(dataset, "train", T))
    # Waste: less than one window (T + 1 tokens) per shard.
    for shard, n in zip(dataset.split("train"), window_counts(dataset, "train", T)):
        assert shard.tokens - n * T - 1 < T + 1
    loaders = [TrainLoader(dataset, B, T, rank, 2, seed=5) for rank in range(2)]
    x, y = loaders[0].next()
    assert x.shape == (B, T) and y.shape == (B, T) and bool((x[:, 1:] == y[:, :-1]).all())
    per_epoch = total // (2 * B)
    seen = [[], []]
    loaders = [TrainLoader(dataset, B, T, rank, 2, seed=5) for rank in range(2)]
    for _ in range(per_epoch):
        for rank, loader in enumerate(loaders):
            seen[rank] += loader.next_windows().tolist()
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == per_epoch * 2 * B > total - 2 * B  # each window once per epoch
    assert seen[0][:B] != sorted(seen[0][:B])  # shuffled, not source order
    next_epoch = loaders[0].next_windows().tolist()
    assert loaders[0].epoch == 1 and next_epoch != seen[0][:B]  # a new order each epoch


def test_loader_state_round_trip(dataset):
    a = TrainLoader(dataset, 2, 32, 1, 2, seed=7)
    for _ in range(5):
        a.next()
    b = TrainLoader(dataset, 2, 32, 1, 2, seed=7)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(3):
        assert bool((a.next()[0] == b.next()[0]).all())


def test_val_windows_are_fixed_and_split_by_rank(dataset):
    v0 = val_batches(dataset, 2, 32, 0, 2, n_batches=3)
    v1 = val_batches(dataset, 2, 32, 1, 2, n_batches=3)
    assert len(v0) == 3 and bool((v0[0][0] == val_batches(dataset, 2, 32, 0, 2, 3)[0][0]).all())
    assert not bool((v0[0][0] == v1[0][0]).all())


def test_launch_maps_slurm_variables():
    env = resolve_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1234",
                       "SLURM_JOB_NODELIST": "node7", "PATH": "/usr/bin"})
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("5", "1", "8")
    assert env["MASTER_ADDR"] == "node7" and env["MASTER_PORT"] == str(20000 + 1234)
    torchrun = resolve_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h",
                            "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (torchrun["RANK"], torchrun["WORLD_SIZE"], torchrun["MASTER_PORT"]) == ("1", "2", "29500")
    alone = resolve_env({})
    assert (alone["RANK"], alone["WORLD_SIZE"], alone["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert math.isfinite(int(alone["MASTER_PORT"]))


@pytest.mark.parametrize("env, message", [
    ({"RANK": "abc", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "RANK 'abc' is not a non-negative whole number"),
    ({"RANK": "0", "WORLD_SIZE": "two", "MASTER_PORT": "1"}, "WORLD_SIZE 'two' is not a non-negative whole number"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK '-1' is not a non-negative whole number"),
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "RANK 3 with WORLD_SIZE 2: a rank must be below"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK 0 with WORLD_SIZE 0"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "SLURM_PROCID 4 with SLURM_NTASKS 4"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "x1", "MASTER_ADDR": "h"},
     "SLURM_JOB_ID 'x1' is not a number"),
])
def test_launch_refuses_a_placement_that_cannot_rendezvous_in_one_line(env, message):
    # Before: a ValueError traceback, a misleading "WORLD_SIZE > 1 but MASTER_PORT is unset", or (rank >= world
    # size) a rendezvous that waited for peers that never come.
    from train.launch import LaunchError
    with pytest.raises(LaunchError) as err:
        resolve_env(env)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_mfu_uses_the_shared_flops_formula_and_peak_table():
    from model.config import GPTConfig
    from model.flops import flops_per_token
    from train.metrics import mfu, peak_flops
    config = GPTConfig.preset("gpt2")
    assert peak_flops(Mfu(), "cpu") is None
    assert peak_flops(Mfu(gpu="h100"), "cpu") == 989e12
    assert peak_flops(Mfu(peak_tflops=100), "cpu") == 100e12
    # 8 GPUs at 1.75M tokens/s (llm.c's 124M on 8xA100): per-GPU FLOP/s over the A100 peak.
    expected = 1.75e6 * flops_per_token(config, 1024) / 8 / 312e12
    assert mfu(1.75e6, config, 1024, 8, 312e12) == pytest.approx(expected)
    assert 0.3 < expected < 0.6
    assert mfu(1.0, config, 1024, 1, None) is None


def test_rotation_keeps_the_newest_and_every_mth_and_never_an_unfinished_tag(tmp_path):
    # Tags marked complete by the module's own write_mark (marks: tests/test_checkpoint_faults.py).
    from train.rundir.checkpoints import complete_tags, rotate, write_mark
    for step in range(1, 11):
        (tmp_path / f"global_step{step}").mkdir()
        if step < 10:  # global_step10 is still being written
            write_mark(tmp_path / f"global_step{step}", step, 1)
    assert [t.name for t in complete_tags(tmp_path)] == [f"global_step{s}" for s in range(1, 10)]
    assert rotate(tmp_path, keep_last=2, keep_every=4) == [1, 2, 3, 5, 6, 7]
    assert sorted(int(p.name[11:]) for p in tmp_path.glob("global_step*")) == [4, 8, 9, 10]
