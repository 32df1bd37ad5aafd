"""train/recipe.py: the one typed recipe (keys, defaults, loader, validation, conversions), the resume check, and
`model plan --recipe` planning exactly what train resolves."""
import contextlib
import dataclasses
import io
import json

import pytest
import yaml

from common import yamlfile
from model.__main__ import main as model_main
from model.config import ConfigError, GPTConfig
from tests.conftest import REPO
from train.recipe import (
    Recipe,
    RecipeChangeError,
    RecipeError,
    batch_plan,
    check_allowed_keys,
    check_resume,
    deepspeed_config,
    load,
    read_deepspeed_file,
    zero_stage,
)
from train.rundir import RunDir, read_recipe

TINY = REPO / "configs/train/tiny-cpu.yaml"
RECIPES = sorted((REPO / "configs/train").glob("*.yaml"))

# The keys and defaults of the untyped recipe this module replaced, verbatim: they must not change (keys are only
# added; data.dir is no longer required, since data.mix may stand in its place: exactly one of the two is checked;
# the model section is saved resolved, as GPTConfig).
DEFAULTS = {
    "run_dir": "<required>", "data": {"dir": None, "mix": []}, "model": GPTConfig().to_dict(),
    "deepspeed": "<required>",
    "precision": "bf16", "compile": False, "activation_checkpointing": False,
    "batch": {"total_tokens": "<required>", "micro_batch": "<required>", "seq_len": "<required>"},
    "optim": {"name": "adamw", "max_lr": 6.0e-4, "min_lr_ratio": 0.1, "warmup_steps": 0, "weight_decay": 0.1,
              "betas": [0.9, 0.95], "eps": 1.0e-8, "grad_clip": 1.0, "muon_lr": 0.02, "muon_momentum": 0.95,
              "muon_weight_decay": 0.0},
    "schedule": {"max_steps": None, "max_tokens": None, "kind": "cosine", "decay_fraction": 0.2,
                 "decay_shape": "linear"},
    "eval": {"every": 250, "val_batches": 20, "command": None},
    "checkpoint": {"every": 1000, "keep_last": 3, "keep_every": 0},
    "sample": {"every": 0, "num": 4, "max_new_tokens": 32, "prompt": "Hello, I'm a language model,"},
    "log": {"every": 1, "tensorboard": True, "wandb": False, "wandb_project": None, "wandb_name": None,
            "wandb_entity": None},
    "init_from": None,
    "mfu": {"gpu": "auto", "peak_tflops": None},
    "seed": 1337,
    "dist_timeout_minutes": 60,
    "heal": {"max_skips_in_a_row": 5, "spike_factor": None, "watchdog_minutes": 30},
}
MINIMAL = ["run_dir=r", "data.dir=d", "deepspeed=ds.json", "batch.total_tokens=128", "batch.micro_batch=2",
           "batch.seq_len=64", "schedule.max_steps=1"]


def test_keys_and_defaults_are_unchanged(tmp_path):
    assert Recipe().to_dict() == DEFAULTS
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    resolved = load(empty, MINIMAL).to_dict()
    given = {"run_dir": "r", "data": {"dir": "d", "mix": []}, "deepspeed": "ds.json",
             "batch": {"total_tokens": 128, "micro_batch": 2, "seq_len": 64},
             "schedule": {**DEFAULTS["schedule"], "max_steps": 1}}
    assert resolved == {**DEFAULTS, **given}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_load_unchanged_and_round_trip_through_config_yaml(path):
    recipe = load(path)
    saved = yaml.safe_load(yaml.safe_dump(recipe.to_dict(), sort_keys=False))  # what RUN/config.yaml holds
    assert Recipe.from_dict(saved) == recipe
    for key, value in yamlfile.load(path).items():  # every value the file sets is the value train runs with
        expected = GPTConfig.from_dict(value).to_dict() if key == "model" else \
            {**DEFAULTS[key], **value} if isinstance(value, dict) else value
        assert saved[key] == expected


def test_recipe_is_typed_and_frozen():
    r = load(TINY)
    assert r.batch.micro_batch == 2 and r.optim.betas == (0.9, 0.95) and r.schedule.max_steps == 200
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.batch.micro_batch = 4


def test_unknown_key_is_named_with_the_known_ones():
    with pytest.raises(RecipeError, match=r"unknown recipe key 'optim.lr'; known keys here: name, max_lr, "
                                          r"min_lr_ratio, warmup_steps, weight_decay, betas, eps, grad_clip"):
        load(TINY, ["optim.lr=1"])
    with pytest.raises(RecipeError, match="unknown recipe key 'checkpoint.export_live_fp32'"):
        load(TINY, ["checkpoint.export_live_fp32=true"])  # a test hook once, no longer a recipe key
    with pytest.raises(RecipeError, match="optim must be a mapping, got 3"):
        load(TINY, ["optim=3"])
    with pytest.raises(RecipeError, match="log.tensorboard must be true or false"):
        load(TINY, ["log.tensorboard=yes please"])


def test_a_saved_recipe_reads_back_and_a_key_it_does_not_know_is_refused_naming_the_file(tmp_path):
    saved = load(TINY).to_dict()
    RunDir(tmp_path).start()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert read_recipe(tmp_path) == load(TINY)
    assert read_recipe(tmp_path / "nothing-yet") is None
    saved["checkpoint"]["export_live_fp32"] = False  # a key of no recipe this version reads
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(RecipeError, match=rf"^{tmp_path / 'config.yaml'}: unknown recipe key 'checkpoint.export_"):
        read_recipe(tmp_path)


def test_one_float_rule_for_train_model_info_and_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = tmp_path / "dropout.yaml"
    recipe.write_text(TINY.read_text().replace("model: {preset: tiny}", "model: {preset: tiny, dropout: 1e-1}"))
    assert load(recipe).model.dropout == 0.1
    assert GPTConfig.resolve(str(recipe)).dropout == 0.1
    assert cli_json(["info", "--model", str(recipe)])["config"]["dropout"] == 0.1
    assert cli_json(["plan", "--recipe", str(recipe)])["model"]["dropout"] == 0.1
    assert cli_json(["plan", "--model", str(recipe)])["model"]["dropout"] == 0.1


def cli_json(argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert model_main([*argv, "--json"]) == 0
    return json.loads(out.getvalue())


# --- model plan --recipe plans what train runs ----------------------------------------------------------------

def max_tokens_recipe(tmp_path):
    path = tmp_path / "tiny-by-tokens.yaml"
    path.write_text(TINY.read_text().replace("schedule: {max_steps: 200}", "schedule: {max_tokens: 1000}"))
    return path


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", [p.name for p in RECIPES] + ["max_tokens"])
def test_plan_and_train_agree_on_steps_tokens_batch_and_zero(name, world, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their DeepSpeed file relative to the checkout, as train reads it
    path = max_tokens_recipe(tmp_path) if name == "max_tokens" else REPO / "configs/train" / name
    recipe = load(path)
    run = batch_plan(recipe, world)  # what Trainer.__init__ computes on `world` ranks
    stage = zero_stage(deepspeed_config(recipe, run))
    plan = cli_json(["plan", "--recipe", str(path), "--gpus", str(world)])
    assert (plan["steps"], plan["tokens"], plan["micro_batch"], plan["grad_accum_steps"], plan["zero"]) == \
        (run.max_steps, run.max_steps * run.total_tokens, run.micro_batch, run.grad_accum, stage)
    assert (plan["seq_len"], plan["batch_tokens"], plan["precision"], plan["activation_checkpointing"]) == \
        (run.seq_len, run.total_tokens, recipe.precision, recipe.activation_checkpointing)
    if name == "max_tokens":
        assert (plan["steps"], plan["tokens"]) == (4, 1024)  # 1000 tokens rounded up to whole 256-token steps


# --- a resume whose recipe differs from the checkpoint's --------------------------------------------------------

def test_resume_check_names_each_difference_and_accepts_only_allowed_keys(tmp_path):
    saved = load(TINY)
    changed = load(TINY, ["optim.max_lr=1e-3", "schedule.max_steps=300", "run_dir=elsewhere"])
    with pytest.raises(RecipeChangeError) as err:
        check_resume(saved, changed, ["schedule.max_steps"], "RUN/checkpoints/global_step6")
    message = str(err.value)
    assert "global_step6" in message and "optim.max_lr 0.003 -> 0.001" in message
    assert "schedule.max_steps" not in message and "run_dir" not in message  # allowed; where the run lives
    assert "--allow-change" in message and "\n" not in message
    assert check_resume(saved, changed, ["optim.max_lr", "schedule.max_steps"], "c") == {
        "optim.max_lr": (0.003, 0.001), "schedule.max_steps": (200, 300)}
    with pytest.raises(RecipeChangeError, match="batch.seq_len 64 -> 32; batch.seq_len cannot change on resume"):
        check_resume(saved, load(TINY, ["batch.seq_len=32"]), [], "c")


def test_allow_change_names_must_be_changeable_keys():
    check_allowed_keys(["optim.max_lr", "data.dir", "batch.micro_batch"])
    with pytest.raises(RecipeError, match="--allow-change seed: seed cannot change on resume"):
        check_allowed_keys(["seed"])
    with pytest.raises(RecipeError, match="--allow-change model.n_layer: model.n_layer cannot change"):
        check_allowed_keys(["model.n_layer"])
    with pytest.raises(RecipeError, match="--allow-change optim.name: optim.name cannot change on resume"):
        check_allowed_keys(["optim.name"])
    with pytest.raises(RecipeError, match="--allow-change optim.lr: not a recipe key that can change; known keys: "
                                          "data.dir, data.mix, deepspeed,"):
        check_allowed_keys(["optim.lr"])


# --- every value bounded, every error one short line ------------------------------------------------------------

@pytest.mark.parametrize("sets,message", [
    (["batch.total_tokens=1180591620717411303424"], "batch.total_tokens must be a positive integer (at most "
                                                    "1,073,741,824), got 1180591620717411303424"),
    (["batch.micro_batch=16777216"], "batch.micro_batch x batch.seq_len = 1,073,741,824 tokens in one forward pass"),
    (["seed=-1"], "seed must be a non-negative integer, got -1"),
    (["seed=9223372036854775808"], "seed must be a non-negative integer (at most 9,223,372,036,854,775,807)"),
    (["sample.every=10", "sample.prompt="], "sample.prompt is empty while sample.every is on"),
    (["sample.num=100000"], "sample.num must be a non-negative integer (at most 1,024)"),
    (["eval.val_batches=0"], "eval.val_batches must be a positive integer, got 0"),
    (["schedule.max_steps=4503599627370496"], "updates of batch.total_tokens 256 is more than 2^53 tokens"),
    (["model.n_embd=1099511627776"], "model: n_embd must be at most 65,536, got 1,099,511,627,776"),
    (["dist_timeout_minutes=0"], "dist_timeout_minutes must be a positive integer, got 0"),
    (["data.dir="], "data.dir must be a non-empty string, got ''"),
    (["run_dir=[1, 2]"], "run_dir must be a non-empty string, got [1, 2]"),
    (["optim.max_lr=1e300"], "optim.max_lr must be a non-negative number, at most 10, got 1e+300"),
    (["optim.muon_lr=10.5"], "optim.muon_lr must be a non-negative number, at most 10, got 10.5"),
    (["optim.weight_decay=11"], "optim.weight_decay must be a non-negative number, at most 10, got 11"),
    (["optim.muon_weight_decay=1e3"], "optim.muon_weight_decay must be a non-negative number, at most 10, got 1000.0"),
    (["optim.eps=0.5"], "optim.eps must be a number in [1e-30, 0.001], got 0.5"),
    (["optim.eps=0"], "optim.eps must be a number in [1e-30, 0.001], got 0"),  # NaN where a gradient is 0
    (["optim.grad_clip=1e9"], "optim.grad_clip must be a non-negative number (0: no clipping), at most 100, "
                              "got 1000000000.0"),
])
def test_every_value_is_bounded_before_anything_starts(sets, message):
    with pytest.raises(RecipeError) as err:
        load(TINY, sets)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_optimizer_values_at_their_bounds_are_taken():
    optim = load(TINY, ["optim.max_lr=10", "optim.muon_lr=10", "optim.weight_decay=10", "optim.muon_weight_decay=10",
                        "optim.eps=1e-3", "optim.grad_clip=100"]).optim
    assert (optim.max_lr, optim.muon_lr, optim.weight_decay, optim.muon_weight_decay, optim.eps, optim.grad_clip) \
        == (10, 10, 10, 10, 1e-3, 100)
    assert load(TINY, ["optim.eps=1e-30", "optim.grad_clip=0", "optim.weight_decay=0"]).optim.eps == 1e-30


def test_sampling_off_needs_no_prompt_and_the_largest_seed_is_taken():
    assert load(TINY, ["sample.every=0", "sample.prompt="]).sample.prompt == ""
    assert load(TINY, ["seed=9223372036854775807"]).seed == 2 ** 63 - 1


def test_micro_steps_per_update_are_bounded_per_world_size():
    recipe = load(TINY, ["batch.total_tokens=1073741824", "batch.micro_batch=1", "batch.seq_len=64"])
    with pytest.raises(RecipeError, match=r"takes 16,777,216 micro steps per update on 1 rank\(s\).*at most 65,536"):
        batch_plan(recipe, 1)
    assert batch_plan(recipe, 512).grad_accum == 32_768  # the same batch on 512 ranks is fine


@pytest.mark.parametrize("sets", [["precision=" + "x" * 2_000_000], ["seed=" + "9" * 100_000],
                                  ["optim.betas=[" + "0.5, " * 20_000 + "0.5]"], ["x" * 3_000_000 + "=1"]])
def test_an_error_quotes_at_most_a_short_prefix_of_a_huge_value(sets):
    with pytest.raises(RecipeError) as err:
        load(TINY, sets)
    assert len(str(err.value)) < 400 and "..." in str(err.value), str(err.value)[:500]


def test_a_yaml_alias_bomb_is_refused_in_one_line_naming_the_file_without_expanding_it(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]  # 9^9
    bomb.write_text(TINY.read_text() + "\n".join(lines) + "\n")
    with pytest.raises(RecipeError, match=rf"^training recipe: {bomb} line \d+: not valid YAML \(an alias \(\*a\): "
                                          r"recipes and model files take no anchors or aliases\)$"):
        load(bomb)
    with pytest.raises(ConfigError, match="take no anchors or aliases"):
        GPTConfig.resolve(str(bomb))


def test_yaml_nested_too_deeply_is_refused_in_one_line_naming_the_file(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 100_000 + "]" * 100_000 + "\n")  # PyYAML's composer recurses per level
    with pytest.raises(RecipeError, match=rf"^training recipe: {deep}: not readable YAML \(nested too deeply\)$"):
        load(deep)
    with pytest.raises(ConfigError, match="nested too deeply"):
        GPTConfig.resolve(str(deep))


def test_a_key_given_twice_is_refused_naming_it_and_its_line(tmp_path):
    # PyYAML and json keep the last of two equal keys: a recipe with `seed:` twice trained with the second.
    twice = tmp_path / "twice.yaml"
    twice.write_text(TINY.read_text() + "seed: 7\n")
    with pytest.raises(RecipeError, match=rf"^training recipe: {twice} line \d+: not valid YAML \(the key 'seed' "
                                          r"twice in one mapping\)$"):
        load(twice)
    with pytest.raises(RecipeError, match=r"^--set 'batch=\{micro_batch: 2, seq_len: 64, seq_len: 32, total_tokens: "
                                          r"256\}': not valid YAML \(the key 'seq_len' twice in one mapping\); "):
        load(TINY, ["batch={micro_batch: 2, seq_len: 64, seq_len: 32, total_tokens: 256}"])
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 1, "stage": 3}}')
    with pytest.raises(RecipeError, match=rf"^{ds}: the key 'stage' twice in one object$"):
        read_deepspeed_file(load(TINY, [f"deepspeed={ds}"]))


@pytest.mark.parametrize("value, problem", [
    ("batch={micro_batch: 2, micro_batch: 4}", "not valid YAML (the key 'micro_batch' twice in one mapping)"),
    ("optim.betas=[0.9, 0.95", "not valid YAML (while parsing a flow sequence: expected ',' or ']', but got "
                               "'<stream end>')"),
    ("batch={micro_batch: 2", "not valid YAML (while parsing a flow mapping: expected ',' or '}', but got "
                              "'<stream end>')"),
    ("model=" + "[" * 100_000 + "]" * 100_000, "not readable YAML (nested too deeply)"),  # was a RecursionError
])
def test_a_set_list_or_mapping_that_is_not_yaml_is_refused_naming_the_set_and_the_problem(value, problem):
    # Taken as text, it was refused later for its type ("batch must be a mapping, got '{...}'").
    with pytest.raises(RecipeError) as err:
        load(TINY, [value])
    message = str(err.value)
    assert message.startswith("--set '" + value[:20]) and problem in message and "\n" not in message, message
    assert len(message) < 400, message


def test_a_set_value_that_is_text_stays_text():
    for text in ("10B", "First Citizen: Hear me: speak", "@user", '"ROMEO:"', '"[INST] hi"'):
        assert load(TINY, [f"sample.prompt={text}"]).sample.prompt == text.strip('"')


def test_counts_in_a_recipe_read_as_the_commands_flags_do():
    # --set batch.total_tokens=512K was refused as "not a number" while prep's --shard-tokens 512K was taken.
    r = load(REPO / "configs/train/tiny-cpu.yaml", ["batch.total_tokens=512", "schedule.max_steps=2K", "seed=1e3"])
    assert (r.batch.total_tokens, r.schedule.max_steps, r.seed) == (512, 2000, 1000)
    assert load(REPO / "configs/train/tiny-cpu.yaml", ["sample.prompt=10B"]).sample.prompt == "10B"  # text stays text
    with pytest.raises(RecipeError, match="schedule.max_steps must be a positive integer, got 1.5"):
        load(REPO / "configs/train/tiny-cpu.yaml", ["schedule.max_steps=1.5"])
    with pytest.raises(RecipeError, match="batch.total_tokens: expected a whole number such as 100M"):
        load(REPO / "configs/train/tiny-cpu.yaml", ["batch.total_tokens=lots"])
