"""The training recipe: YAML + `--set a.b=c` overrides -> one validated, typed Recipe, and what follows from it.

A Recipe is a tree of frozen dataclasses; its fields are the only keys a recipe may hold, their defaults are the
defaults, and REQUIRED marks what must be given. One loader (load) reads a file through common.yamlfile (the one
float rule), applies the overrides, and runs the one validation pass (check). to_dict() / from_dict() convert to
and from the mapping saved as RUN/config.yaml and in each checkpoint's client state. `model:` is free-form here
and validated by model.GPTConfig.from_dict.

Also here, because each is a function of the recipe alone: the batch arithmetic (batch_plan), the DeepSpeed
config the engine is built with (deepspeed_config, zero_stage), the model shape (Recipe.model_config) and the
start-up table.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common import yamlfile
from common.errors import PipelineError, UsageError
from model.config import ConfigError as ModelConfigError
from model.config import GPTConfig


class RecipeError(UsageError):
    """A recipe that cannot run; the message names the key and the problem (exit 2, like a bad flag)."""


REQUIRED = "<required>"

# Keys earlier versions wrote into RUN/config.yaml and client states; ignored when reading a saved recipe.
RETIRED_KEYS = ("checkpoint.export_live_fp32",)


@dataclass(frozen=True)
class Data:
    dir: str = REQUIRED


@dataclass(frozen=True)
class Batch:
    total_tokens: int = REQUIRED
    micro_batch: int = REQUIRED
    seq_len: int = REQUIRED


@dataclass(frozen=True)
class Optim:
    max_lr: float = 6.0e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1.0e-8
    grad_clip: float = 1.0


@dataclass(frozen=True)
class Schedule:
    # Exactly one of max_steps / max_tokens; max_tokens is rounded up to whole steps.
    max_steps: int | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class Eval:
    every: int = 250
    val_batches: int = 20
    command: str | None = None


@dataclass(frozen=True)
class Checkpoint:
    every: int = 1000
    keep_last: int = 3
    keep_every: int = 0


@dataclass(frozen=True)
class Sample:
    every: int = 0
    num: int = 4
    max_new_tokens: int = 32
    prompt: str = "Hello, I'm a language model,"


@dataclass(frozen=True)
class Log:
    every: int = 1
    tensorboard: bool = True


@dataclass(frozen=True)
class Mfu:
    # Peak FLOP/s for MFU: gpu "auto" reads the CUDA device name; peak_tflops overrides the table.
    gpu: str = "auto"
    peak_tflops: float | None = None


@dataclass(frozen=True)
class Recipe:
    run_dir: str = REQUIRED
    data: Data = field(default_factory=Data)
    # Free-form: GPTConfig.from_dict validates it (see model_config); treat it as read-only like the rest.
    model: dict = field(default_factory=dict)
    deepspeed: str = REQUIRED
    # bf16 on GPUs (the DeepSpeed files enable it); fp32 for CPU runs, where bf16 matmuls are ~10x slower.
    precision: str = "bf16"
    # Speed/memory switches of the training forward; neither changes the weights, the checkpoints or their keys.
    # compile: torch.compile the module in place (DeepSpeed's engine.compile); not with ZeRO-3.
    # activation_checkpointing: recompute each block in backward instead of keeping its activations.
    compile: bool = False
    activation_checkpointing: bool = False
    batch: Batch = field(default_factory=Batch)
    optim: Optim = field(default_factory=Optim)
    schedule: Schedule = field(default_factory=Schedule)
    eval: Eval = field(default_factory=Eval)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    sample: Sample = field(default_factory=Sample)
    log: Log = field(default_factory=Log)
    mfu: Mfu = field(default_factory=Mfu)
    seed: int = 1337

    # ---- conversions -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict, where: str = "recipe") -> "Recipe":
        """A mapping (a parsed recipe file or a saved config.yaml) -> a validated Recipe; `where` names it."""
        if not isinstance(values, dict):
            raise RecipeError(f"{where}: a recipe is a mapping of keys, got {type(values).__name__}")
        recipe = _build(cls, values, "")
        check(recipe)
        return recipe

    @classmethod
    def from_saved(cls, values: dict, where: str) -> "Recipe":
        """A recipe this or an earlier version saved (config.yaml, client state): retired keys are dropped."""
        return cls.from_dict(drop_retired(values), where)

    def to_dict(self) -> dict:
        """Plain types only (lists, not tuples): what config.yaml and the checkpoint's client state hold."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = _plain(value)
        return out

    # ---- derived ---------------------------------------------------------------------------------------------
    def model_config(self) -> GPTConfig:
        try:
            return GPTConfig.from_dict(self.model)
        except (ModelConfigError, TypeError) as exc:
            raise RecipeError(f"model: {exc}") from None

    @property
    def max_steps(self) -> int:
        """Optimizer steps the run takes: schedule.max_steps, or max_tokens rounded up to whole steps."""
        return self.schedule.max_steps or -(-self.schedule.max_tokens // self.batch.total_tokens)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _build(cls, values: dict, where: str):
    """values (a mapping) -> an instance of the dataclass cls, naming any unknown key with the known ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}{key}"
        if key not in fields:
            raise RecipeError(f"unknown recipe key {path!r}; known keys here: {', '.join(fields)}")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING \
            else fields[key].default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise RecipeError(f"{path} must be a mapping, got {value!r}")
            kwargs[key] = _build(type(default), value, f"{path}.")
        elif isinstance(default, dict):  # the free-form model section
            if not isinstance(value, dict):
                raise RecipeError(f"{path} must be a mapping, got {value!r}")
            kwargs[key] = copy.deepcopy(value)
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def drop_retired(values: dict) -> dict:
    values = copy.deepcopy(values)
    for dotted in RETIRED_KEYS:
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return values


def flatten(values: dict, where: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; the free-form model section is flattened too (model.n_layer)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{where}{key}."))
        else:
            out[f"{where}{key}"] = value
    return out


def known_keys() -> list[str]:
    """Every settable dotted key except model.* (free-form)."""
    return list(flatten(_plain(Recipe())))


# ---- the loader ----------------------------------------------------------------------------------------------

def parse_overrides(pairs: list[str]) -> dict:
    """`a.b=c` strings -> nested dict; values are parsed as YAML (numbers, true/false, null, lists)."""
    tree: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set expects key=value, got {pair!r}")
        try:
            value = yamlfile.parse(raw) if raw != "" else ""
        except yaml.YAMLError:  # a value that is not YAML is taken as text
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return tree


def _deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def load(path, overrides: list[str] | None = None) -> Recipe:
    """The recipe file at `path` with `--set` overrides applied, validated."""
    path = Path(path)
    try:
        raw = yamlfile.load(path)
    except PipelineError as exc:
        raise RecipeError(f"training recipe: {exc}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    return Recipe.from_dict(_deep_update(raw, parse_overrides(overrides or [])), str(path))


def read_run_recipe(run_dir) -> Recipe | None:
    """RUN/config.yaml as the trainer saved it, or None when the run has not started yet."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    try:
        raw = yamlfile.load(path)
    except PipelineError as exc:
        raise RecipeError(str(exc)) from None
    return Recipe.from_saved(raw if raw is not None else {}, str(path))


# ---- the validation pass -------------------------------------------------------------------------------------

def _get(recipe: Recipe, dotted: str):
    node = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _positive_int(recipe: Recipe, dotted: str, allow_zero: bool = False) -> int:
    node = _get(recipe, dotted)
    ok = isinstance(node, int) and not isinstance(node, bool) and (node >= 0 if allow_zero else node > 0)
    if not ok:
        raise RecipeError(f"{dotted} must be a {'non-negative' if allow_zero else 'positive'} integer, got {node!r}")
    return node


def check(recipe: Recipe) -> None:
    """Every rule a recipe must meet to be run; the first one broken is a RecipeError naming the key."""
    for key, value in flatten(_plain(recipe)).items():
        if value == REQUIRED:
            raise RecipeError(f"recipe key {key} is required")
    for key in ("run_dir", "data.dir", "deepspeed", "sample.prompt", "mfu.gpu"):
        if not isinstance(_get(recipe, key), str):
            raise RecipeError(f"{key} must be a string, got {_get(recipe, key)!r}")
    for key in ("batch.total_tokens", "batch.micro_batch", "batch.seq_len", "log.every", "eval.val_batches"):
        _positive_int(recipe, key)
    for key in ("optim.warmup_steps", "eval.every", "checkpoint.every", "checkpoint.keep_last",
                "checkpoint.keep_every", "sample.every", "sample.num", "sample.max_new_tokens", "seed"):
        _positive_int(recipe, key, allow_zero=True)
    for key in ("compile", "activation_checkpointing", "log.tensorboard"):
        if not isinstance(_get(recipe, key), bool):
            raise RecipeError(f"{key} must be true or false, got {_get(recipe, key)!r}")
    if recipe.precision not in ("bf16", "fp32"):
        raise RecipeError(f"precision must be bf16 or fp32, got {recipe.precision!r}")
    optim = recipe.optim
    for key in ("max_lr", "min_lr_ratio", "weight_decay", "eps", "grad_clip"):
        value = getattr(optim, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise RecipeError(f"optim.{key} must be a non-negative number, got {value!r}")
    if optim.min_lr_ratio > 1:
        raise RecipeError(f"optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio}")
    betas = optim.betas
    if not (isinstance(betas, tuple) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise RecipeError(f"optim.betas must be two numbers in [0, 1), got {_plain(betas)!r}")
    schedule = recipe.schedule
    if (schedule.max_steps is None) == (schedule.max_tokens is None):
        raise RecipeError("give exactly one of schedule.max_steps and schedule.max_tokens")
    for key in ("max_steps", "max_tokens"):
        if getattr(schedule, key) is not None:
            _positive_int(recipe, f"schedule.{key}")
    if recipe.eval.command is not None and not isinstance(recipe.eval.command, str):
        raise RecipeError(f"eval.command must be a string or null, got {recipe.eval.command!r}")
    if recipe.checkpoint.keep_last < 1:
        raise RecipeError("checkpoint.keep_last must be at least 1 (the newest checkpoint is always kept)")
    peak = recipe.mfu.peak_tflops
    if peak is not None and (not isinstance(peak, (int, float)) or isinstance(peak, bool) or peak <= 0):
        raise RecipeError(f"mfu.peak_tflops must be a positive number or null, got {peak!r}")
    block = recipe.model_config().block_size  # raises on a bad model section
    if recipe.batch.seq_len > block:
        raise RecipeError(f"batch.seq_len ({recipe.batch.seq_len}) exceeds the model's block_size ({block})")


# ---- resuming with a changed recipe -------------------------------------------------------------------------

# Where the run lives, not how it trains: a run directory may be moved or copied and resumed there.
NOT_COMPARED = ("run_dir",)
# The model's shape is compared as a whole (resolved GPTConfig) by the trainer; seq_len and seed fix the loader's
# window numbering and order, which its saved position counts in: none of them can change on resume.
FIXED_ON_RESUME = ("model", "batch.seq_len", "seed")
ABSENT = "<absent>"


class RecipeChangeError(RecipeError):
    """A resume whose recipe differs from its checkpoint's in keys the user did not allow (exit 2)."""


def _fixed(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FIXED_ON_RESUME)


def check_allowed_keys(allowed: list[str]) -> None:
    """--allow-change names: each must be a recipe key that may change on resume."""
    known = known_keys()
    for key in allowed:
        if _fixed(key):
            raise RecipeError(f"--allow-change {key}: {key} cannot change on resume "
                              f"(fixed: {', '.join(FIXED_ON_RESUME)}); start a new run_dir instead")
        if key not in known or key in NOT_COMPARED:
            raise RecipeError(f"--allow-change {key}: not a recipe key that can change; known keys: "
                              f"{', '.join(k for k in known if not _fixed(k) and k not in NOT_COMPARED)}")


def recipe_changes(saved: dict, recipe: Recipe) -> dict[str, tuple]:
    """{dotted key: (checkpoint's value, this recipe's value)} for every compared key that differs."""
    old, new = flatten(_plain(drop_retired(saved))), flatten(recipe.to_dict())
    changes = {}
    for key in list(old) + [k for k in new if k not in old]:
        before, after = old.get(key, ABSENT), new.get(key, ABSENT)
        if before != after and key not in NOT_COMPARED and not key.startswith("model."):
            changes[key] = (before, after)
    return changes


def check_resume(saved: dict, recipe: Recipe, allowed: list[str], checkpoint) -> dict[str, tuple]:
    """The accepted changes from the checkpoint's recipe `saved` to `recipe`; a RecipeChangeError names every
    difference not in `allowed`. (The model's shape is the trainer's check, before this one.)"""
    check_allowed_keys(allowed)
    changes = recipe_changes(saved, recipe)
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        listed = ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in refused.items())
        fixed = [k for k in refused if _fixed(k)]
        advice = (f"{', '.join(fixed)} cannot change on resume; use a new run_dir" if fixed else
                  "resume with the checkpoint's values, or accept each change with --allow-change KEY")
        raise RecipeChangeError(f"the recipe differs from the one {checkpoint} was trained with: {listed}; {advice}")
    return changes


# ---- what follows from a recipe ------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchPlan:
    """total_tokens = micro_batch x seq_len x grad_accum x world_size, exactly."""
    micro_batch: int
    seq_len: int
    grad_accum: int
    world_size: int
    total_tokens: int
    max_steps: int


def batch_plan(recipe: Recipe, world_size: int) -> BatchPlan:
    b = recipe.batch
    per_micro_step = b.micro_batch * b.seq_len * world_size
    if b.total_tokens % per_micro_step:
        raise RecipeError(
            f"batch.total_tokens {b.total_tokens} is not a multiple of micro_batch {b.micro_batch} x seq_len "
            f"{b.seq_len} x world_size {world_size} = {per_micro_step} "
            f"({b.total_tokens} / {per_micro_step} = {b.total_tokens / per_micro_step:.4g}); "
            f"change batch.total_tokens or batch.micro_batch")
    return BatchPlan(b.micro_batch, b.seq_len, b.total_tokens // per_micro_step, world_size, b.total_tokens,
                     recipe.max_steps)


def read_deepspeed_file(recipe: Recipe) -> dict:
    """The DeepSpeed JSON the recipe names, as written (deepspeed_config fills it in)."""
    path = Path(recipe.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except OSError as exc:
        raise RecipeError(f"deepspeed config {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"deepspeed config {path}: not valid JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise RecipeError(f"deepspeed config {path}: a JSON object is expected, got {type(ds).__name__}")
    return ds


def deepspeed_config(recipe: Recipe, plan: BatchPlan) -> dict:
    """The DeepSpeed JSON named by the recipe, with batch sizes, clipping and precision filled in from it.

    Batch keys and gradient_clipping come only from the recipe: a DeepSpeed file that sets them differently is an
    error rather than a silent second source of truth.
    """
    path = Path(recipe.deepspeed)
    ds = read_deepspeed_file(recipe)
    filled = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.micro_batch * plan.grad_accum * plan.world_size,
        "gradient_clipping": float(recipe.optim.grad_clip),
    }
    for key, value in filled.items():
        if key in ds and ds[key] not in ("auto", value):
            raise RecipeError(f"deepspeed config {path} sets {key}={ds[key]!r} but the recipe gives {value!r}; "
                              f"remove it from the JSON (the trainer fills it in)")
        ds[key] = value
    if recipe.precision == "fp32":
        ds["bf16"] = {"enabled": False}
        ds.get("data_types", {}).pop("grad_accum_dtype", None)
    else:
        ds.setdefault("bf16", {})["enabled"] = True
    if ds.get("fp16", {}).get("enabled"):
        raise RecipeError(f"deepspeed config {path} enables fp16; this trainer uses bf16 or fp32 (recipe precision)")
    if recipe.compile and zero_stage(ds) == 3:
        # Measured (2 CPU ranks): it trains, but dynamo traces into ZeRO-3's per-module parameter gather/release
        # hooks, hits its recompile limit and falls back to eager there, so compiling buys nothing and costs a
        # minute. DeepSpeed's route for ZeRO-3 is its DeepCompile backend, not wired in here.
        raise RecipeError(f"compile: true with ZeRO stage 3 ({path}) is not supported; use ZeRO 0-2 or compile: false")
    ds.setdefault("steps_per_print", 10 ** 9)  # our own metrics replace DeepSpeed's periodic prints
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def startup_table(recipe: Recipe, plan: BatchPlan, ds_config: dict, n_params: int, compiled: bool = False,
                  checkpointing: bool = False) -> str:
    """The resolved recipe, then derived numbers; compiled / checkpointing are read back from the built engine."""
    rows = [("recipe key", "value")]
    for key, value in flatten(recipe.to_dict()).items():
        rows.append((key, json.dumps(value) if not isinstance(value, str) else value))
    rows += [
        ("-- derived", ""),
        ("parameters", f"{n_params:,}"),
        ("world_size", str(plan.world_size)),
        ("grad_accum", f"{plan.total_tokens} / ({plan.micro_batch} x {plan.seq_len} x {plan.world_size}) "
                       f"= {plan.grad_accum}"),
        ("max_steps", str(plan.max_steps)),
        ("tokens total", f"{plan.max_steps * plan.total_tokens:,}"),
        ("zero stage", str(zero_stage(ds_config))),
        ("bf16", str(ds_config.get("bf16", {}).get("enabled", False))),
        ("engine compiled", str(compiled)),
        ("module activation checkpointing", str(checkpointing)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
