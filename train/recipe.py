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
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common import yamlfile
from common.errors import PipelineError, UsageError
from model.config import ConfigError as ModelConfigError
from model.config import GPTConfig

from .heal import Heal
from .schedule import DECAY_SHAPES, KINDS, decay_steps


class RecipeError(UsageError):
    """A recipe that cannot run; the message names the key and the problem (exit 2, like a bad flag)."""


REQUIRED = "<required>"

OPTIMIZERS = ("adamw", "muon")

# Keys earlier versions wrote into RUN/config.yaml and client states; ignored when reading a saved recipe.
RETIRED_KEYS = ("checkpoint.export_live_fp32",)


@dataclass(frozen=True)
class MixEntry:
    dir: str = REQUIRED
    weight: float = REQUIRED  # relative: the weights of a mix are normalised to sum to 1
    name: str | None = None  # in metrics (val_loss/NAME) and the loader state; default: the directory's name


@dataclass(frozen=True)
class Data:
    # Exactly one of dir (one prepared dataset) and mix (several, each drawn at its weight; docs/train.md, Mixtures).
    dir: str | None = None
    mix: tuple = field(default=(), metadata={"items": MixEntry})

    def entries(self) -> list[tuple[str, str, float]]:
        """(name, directory, weight as written) of each dataset the run reads."""
        if not self.mix:
            return [(Path(self.dir).name, self.dir, 1)]
        return [(e.name if e.name is not None else Path(e.dir).name, e.dir, e.weight) for e in self.mix]


@dataclass(frozen=True)
class Batch:
    total_tokens: int = REQUIRED
    micro_batch: int = REQUIRED
    seq_len: int = REQUIRED


@dataclass(frozen=True)
class Optim:
    # adamw: AdamW on every parameter. muon: Muon on the transformer blocks' weight matrices and AdamW (max_lr,
    # betas, eps, weight_decay) on the rest: embeddings, biases, gains (train/optim.py, docs/train.md).
    name: str = "adamw"
    max_lr: float = 6.0e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1.0e-8
    grad_clip: float = 1.0
    # Muon's peak lr, momentum (Nesterov) and decoupled weight decay: modded-nanogpt's Muon record of 2024-10-29.
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0


@dataclass(frozen=True)
class Schedule:
    # Exactly one of max_steps / max_tokens; max_tokens is rounded up to whole steps.
    max_steps: int | None = None
    max_tokens: int | None = None
    # The lr multiplier over the run (train/schedule.py): cosine, or warmup-stable-decay with its decay over the
    # last decay_fraction of the updates, linear or 1-sqrt. Warmup and the floor are optim.warmup_steps and
    # optim.min_lr_ratio, for both.
    kind: str = "cosine"
    decay_fraction: float = 0.2
    decay_shape: str = "linear"


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
    # Weights & Biases (train.wandb_log): project default gpt2-pipeline, name default the run directory's name.
    wandb: bool = False
    wandb_project: str | None = None
    wandb_name: str | None = None
    wandb_entity: str | None = None


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
    # Warm start: the initial weights of a new run from an HF GPT-2 directory or another run (train.warm_start).
    init_from: str | None = None
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
    heal: Heal = field(default_factory=Heal)  # skipping bad updates, the watchdog (train.heal)
    seed: int = 1337
    # How long a collective waits for the slowest rank before the run fails; rank-0-only work (a universal
    # checkpoint conversion, a save to a slow filesystem) holds the others in one (docs/train.md).
    dist_timeout_minutes: int = 60

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
        elif "items" in fields[key].metadata:  # a list of sections (data.mix)
            value = [] if value is None else value
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise RecipeError(f"{path} must be a list of mappings, got {value!r}")
            item = fields[key].metadata["items"]
            kwargs[key] = tuple(_build(item, v, f"{path}[{i}].") for i, v in enumerate(value))
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
    _check_data(recipe.data)
    if recipe.init_from is not None and (not isinstance(recipe.init_from, str) or not recipe.init_from):
        raise RecipeError(f"init_from must be a path or null, got {recipe.init_from!r}")
    for key in ("run_dir", "deepspeed", "sample.prompt", "mfu.gpu"):
        if not isinstance(_get(recipe, key), str):
            raise RecipeError(f"{key} must be a string, got {_get(recipe, key)!r}")
    for key in ("batch.total_tokens", "batch.micro_batch", "batch.seq_len", "log.every", "eval.val_batches",
                "dist_timeout_minutes"):
        _positive_int(recipe, key)
    for key in ("optim.warmup_steps", "eval.every", "checkpoint.every", "checkpoint.keep_last",
                "checkpoint.keep_every", "sample.every", "sample.num", "sample.max_new_tokens", "seed"):
        _positive_int(recipe, key, allow_zero=True)
    for key in ("wandb_project", "wandb_name", "wandb_entity"):
        value = getattr(recipe.log, key)
        if value is not None and (not isinstance(value, str) or not value):
            raise RecipeError(f"log.{key} must be a non-empty string or null, got {value!r}")
    for key in ("compile", "activation_checkpointing", "log.tensorboard", "log.wandb"):
        if not isinstance(_get(recipe, key), bool):
            raise RecipeError(f"{key} must be true or false, got {_get(recipe, key)!r}")
    if recipe.precision not in ("bf16", "fp32"):
        raise RecipeError(f"precision must be bf16 or fp32, got {recipe.precision!r}")
    optim = recipe.optim
    if optim.name not in OPTIMIZERS:
        raise RecipeError(f"optim.name must be {' or '.join(OPTIMIZERS)}, got {optim.name!r}")
    for key in ("max_lr", "min_lr_ratio", "weight_decay", "eps", "grad_clip", "muon_lr", "muon_weight_decay"):
        value = getattr(optim, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise RecipeError(f"optim.{key} must be a non-negative number, got {value!r}")
    if optim.min_lr_ratio > 1:
        raise RecipeError(f"optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio}")
    betas = optim.betas
    if not (isinstance(betas, tuple) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise RecipeError(f"optim.betas must be two numbers in [0, 1), got {_plain(betas)!r}")
    momentum = optim.muon_momentum
    if not (isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and 0 <= momentum < 1):
        raise RecipeError(f"optim.muon_momentum must be a number in [0, 1), got {momentum!r}")
    schedule = recipe.schedule
    if (schedule.max_steps is None) == (schedule.max_tokens is None):
        raise RecipeError("give exactly one of schedule.max_steps and schedule.max_tokens")
    for key in ("max_steps", "max_tokens"):
        if getattr(schedule, key) is not None:
            _positive_int(recipe, f"schedule.{key}")
    _check_lr_shape(recipe)
    recipe.heal.check()
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


# A dataset's name becomes a metrics key (val_loss/NAME) and a TensorBoard tag.
DATASET_NAME = re.compile(r"[A-Za-z0-9._-]+")
# The finest share a mixture interleaves (train.data.Interleave.RESOLUTION).
MIX_RESOLUTION = 65536


def _check_data(data: Data) -> None:
    if (data.dir is None) == (not data.mix):
        both = ("; both are set (a recipe file's data.dir is cleared with --set data.dir=null)"
                if data.dir is not None else "")
        raise RecipeError(f"give exactly one of data.dir (one dataset) and data.mix (several, with weights){both}")
    if data.dir is not None:
        if not isinstance(data.dir, str):
            raise RecipeError(f"data.dir must be a string, got {data.dir!r}")
        return
    if len(data.mix) < 2:
        raise RecipeError("data.mix lists one dataset; a mixture needs two or more (one dataset is data.dir)")
    names, dirs = {}, {}
    for i, entry in enumerate(data.mix):
        where = f"data.mix[{i}]"
        if entry.dir == REQUIRED or not isinstance(entry.dir, str) or not entry.dir:
            raise RecipeError(f"{where}.dir is required: the directory of a prepared dataset, got {entry.dir!r}")
        weight = entry.weight
        if weight == REQUIRED:
            raise RecipeError(f"{where}.weight is required (a positive number; the weights are normalised)")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight <= 0:
            raise RecipeError(f"{where}.weight must be a positive number, got {weight!r}")
        name = entry.name if entry.name is not None else Path(entry.dir).name
        if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
            raise RecipeError(f"{where}: the name {name!r} is not letters, digits, '.', '_' or '-'; set {where}.name")
        if name in names:
            raise RecipeError(f"{where}: the name {name!r} is data.mix[{names[name]}]'s too; set {where}.name")
        resolved = Path(entry.dir).resolve()
        if resolved in dirs:
            raise RecipeError(f"{where}.dir {entry.dir} is data.mix[{dirs[resolved]}]'s too; list each dataset once, "
                              f"with the weights added")
        names[name], dirs[resolved] = i, i
    total = sum(e.weight for e in data.mix)
    for i, entry in enumerate(data.mix):
        if entry.weight / total < 1 / MIX_RESOLUTION:
            raise RecipeError(f"data.mix[{i}].weight {entry.weight} is below 1/{MIX_RESOLUTION:,} of the total "
                              f"({total}), finer than the interleaving resolves")


def _check_lr_shape(recipe: Recipe) -> None:
    schedule = recipe.schedule
    if schedule.kind not in KINDS:
        raise RecipeError(f"schedule.kind must be {' or '.join(KINDS)}, got {schedule.kind!r}")
    if schedule.decay_shape not in DECAY_SHAPES:
        raise RecipeError(f"schedule.decay_shape must be {' or '.join(DECAY_SHAPES)}, got {schedule.decay_shape!r}")
    fraction = schedule.decay_fraction
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1):
        raise RecipeError(f"schedule.decay_fraction must be a number in (0, 1], got {fraction!r}")
    if schedule.kind == "wsd":
        decay = decay_steps(recipe.max_steps, fraction)
        if recipe.optim.warmup_steps + decay > recipe.max_steps:
            raise RecipeError(f"schedule.kind wsd: the warmup ({recipe.optim.warmup_steps} updates) and the decay "
                              f"({decay} updates, decay_fraction {fraction} of {recipe.max_steps}) overlap; "
                              f"shorten optim.warmup_steps or schedule.decay_fraction")


def schedule_shape(recipe: Recipe) -> dict:
    """The arguments of train.schedule.lr_multiplier the recipe fixes (all but step and max_steps)."""
    s = recipe.schedule
    return {"warmup_steps": recipe.optim.warmup_steps, "min_lr_ratio": recipe.optim.min_lr_ratio, "kind": s.kind,
            "decay_fraction": s.decay_fraction, "decay_shape": s.decay_shape}


# ---- resuming with a changed recipe -------------------------------------------------------------------------

# Where the run lives, not how it trains: a run directory may be moved or copied and resumed there. init_from
# seeds step 0 only: a resume continues its own checkpoint.
NOT_COMPARED = ("run_dir", "init_from")
# The model's shape is compared as a whole (resolved GPTConfig) by the trainer; seq_len and seed fix the loader's
# window numbering and order, which its saved position counts in: none of them can change on resume.
# optim.name: the saved optimizer state is another optimizer's (AdamW's moments, Muon's momentum buffers), in
# another number of param groups; DeepSpeed would fail deep inside its load, or mix the two.
FIXED_ON_RESUME = ("model", "batch.seq_len", "seed", "optim.name")
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
    # A key the checkpoint's version did not have yet was added with a default that keeps the earlier behaviour
    # (optim.name adamw, schedule.kind cosine, ...): absent means that default.
    defaults = {k: v for k, v in flatten(_plain(Recipe())).items() if v != REQUIRED and not k.startswith("model.")}
    changes = {}
    for key in list(old) + [k for k in new if k not in old]:
        before, after = old.get(key, defaults.get(key, ABSENT)), new.get(key, ABSENT)
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
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise RecipeError(f"deepspeed config {path} has an {key!r} section; the recipe's optim and schedule "
                              f"sections build them (train/optim.py): remove it from the JSON")
    check_muon(recipe, ds, path)
    if recipe.compile and zero_stage(ds) == 3:
        # Measured (2 CPU ranks): it trains, but dynamo traces into ZeRO-3's per-module parameter gather/release
        # hooks, hits its recompile limit and falls back to eager there, so compiling buys nothing and costs a
        # minute. DeepSpeed's route for ZeRO-3 is its DeepCompile backend, not wired in here.
        raise RecipeError(f"compile: true with ZeRO stage 3 ({path}) is not supported; use ZeRO 0-2 or compile: false")
    ds.setdefault("steps_per_print", 10 ** 9)  # our own metrics replace DeepSpeed's periodic prints
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def optimizer_offload(ds_config: dict) -> bool:
    """The DeepSpeed config keeps optimizer state in CPU memory or on NVMe (ZeRO-Offload)."""
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def bf16_optimizer(ds_config: dict) -> bool:
    """DeepSpeed 0.19.8 wraps the optimizer in its BF16_Optimizer: bf16 with fp32 gradient accumulation at ZeRO 1."""
    accum = ds_config.get("data_types", {}).get("grad_accum_dtype")
    return (ds_config.get("bf16", {}).get("enabled", False) and accum in ("fp32", "float32")
            and zero_stage(ds_config) == 1 and not optimizer_offload(ds_config))


def check_muon(recipe: Recipe, ds: dict, path) -> None:
    """Refuse, in one line each, the combinations with Muon that DeepSpeed 0.19.8 runs other than as Muon + AdamW
    (each checked by tests/test_muon.py against a reference; docs/train.md, Choosing an optimizer)."""
    if recipe.optim.name != "muon":
        return
    stage = zero_stage(ds)
    where = f"optim.name muon with {path} (ZeRO stage {stage}, {recipe.precision})"
    if optimizer_offload(ds):
        raise RecipeError(f"{where}: optimizer offload is not supported with Muon here (its CPU path is untested); "
                          f"use a config without offload_optimizer")
    if stage == 0 and recipe.precision == "bf16":
        # Its wrapper for ZeRO 0 bf16 takes one optimizer step on zero gradients at start-up. For AdamW the
        # trainer undoes it (train/optim.forget_start_up_step, tested); with Muon's mixed groups that is untested.
        raise RecipeError(f"{where}: DeepSpeed's ZeRO-0 bf16 wrapper takes a dummy optimizer step at start-up, "
                          f"which is undone for AdamW only; use ZeRO 1 (configs/deepspeed/zero1.json) or fp32")
    if recipe.optim.grad_clip > 0 and stage > 0 and not bf16_optimizer(ds):
        # There the Muon update is written into the gradient partitions before the norm is taken: the clip scales
        # the orthogonalised update by grad_clip / (norm of updates and gradients) -- 0.025x in the tests.
        raise RecipeError(f"{where}: DeepSpeed clips Muon's orthogonalised update here, not the gradient, which "
                          f"shrinks every Muon step; set optim.grad_clip=0, or use bf16 with "
                          f"data_types.grad_accum_dtype fp32 at ZeRO 1 (configs/deepspeed/zero1.json), which clips "
                          f"the gradient first")
    if stage == 3:
        if ds["zero_optimization"].get("reduce_scatter", False):
            raise RecipeError(f"{where}: DeepSpeed's ZeRO-3 Muon needs zero_optimization.reduce_scatter false; "
                              f"remove it from the JSON or set it false")
        ds["zero_optimization"]["reduce_scatter"] = False  # its default is true, which ZeRO-3 Muon refuses


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def startup_table(recipe: Recipe, plan: BatchPlan, ds_config: dict, n_params: int, compiled: bool = False,
                  checkpointing: bool = False, data_rows: list[tuple[str, str]] = ()) -> str:
    """The resolved recipe, then derived numbers; compiled / checkpointing are read back from the built engine,
    data_rows (the epochs of each dataset) from the loader."""
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
        *data_rows,
        ("zero stage", str(zero_stage(ds_config))),
        ("bf16", str(ds_config.get("bf16", {}).get("enabled", False))),
        ("engine compiled", str(compiled)),
        ("module activation checkpointing", str(checkpointing)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
