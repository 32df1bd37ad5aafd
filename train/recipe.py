"""The training recipe: YAML + `--set a.b=c` overrides -> one validated, typed Recipe, and what follows from it.

A Recipe is a tree of frozen dataclasses, one per section, each defined beside the code that uses it and checking
its own values: data (train.data.Data, with the mixture rules), model (model.config.GPTConfig), optim
(train.optim.Optim, with the Muon x ZeRO rules), schedule (train.schedule.Schedule), and the small sections below.
Their fields are the only keys a recipe may hold, their defaults are the defaults, and REQUIRED marks what must be
given. One loader (load) reads a file through common.yamlfile (the one float rule), applies the overrides and
builds the Recipe; Recipe.check runs each section's check, then the rules between sections. to_dict() /
from_dict() convert to and from the mapping saved as RUN/config.yaml and in each checkpoint's client state.

Also here, because each is a function of the recipe alone: the batch arithmetic (batch_plan), the DeepSpeed
config the engine is built with (deepspeed_config) and the start-up table.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common import cli, files, yamlfile
from common.errors import PipelineError
from model.config import ConfigError as ModelConfigError
from model.config import GPTConfig

from .data import Data
from .optim import Optim, check_deepspeed, zero_stage
from .heal import Heal
from .schedule import Schedule
from .section import MAX_INT, MAX_SEED, REQUIRED, RecipeError, boolean, choice, integer, number, shown, string

PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class Batch:
    total_tokens: int = REQUIRED
    micro_batch: int = REQUIRED
    seq_len: int = REQUIRED

    def check(self) -> None:
        # Tokens per update: the largest published batches are ~2^24 tokens (16M); 2^30 leaves 64x room and keeps
        # a typo (2^70) from reaching the engine. Micro steps per update are bounded in batch_plan, per world size.
        integer("batch.total_tokens", self.total_tokens, high=MAX_BATCH_TOKENS)
        integer("batch.micro_batch", self.micro_batch, high=MAX_MICRO_TOKENS)
        integer("batch.seq_len", self.seq_len, high=MAX_MICRO_TOKENS)
        if self.micro_batch * self.seq_len > MAX_MICRO_TOKENS:
            raise RecipeError(f"batch.micro_batch x batch.seq_len = {self.micro_batch * self.seq_len:,} tokens in "
                              f"one forward pass; at most {MAX_MICRO_TOKENS:,}")


MAX_BATCH_TOKENS = 2 ** 30
# Tokens one rank runs through one forward pass: 2^24 is beyond any GPU's memory for GPT-2 (its activations alone
# would be terabytes), so a larger value can only be a typo.
MAX_MICRO_TOKENS = 2 ** 24
# Micro steps one update may take on one rank (batch.total_tokens / (micro_batch x seq_len x world size)): each is
# a forward and backward pass, and 2^16 of them make one update take hours on any hardware.
MAX_GRAD_ACCUM = 2 ** 16


@dataclass(frozen=True)
class Eval:
    every: int = 250
    val_batches: int = 20
    command: str | None = None

    def check(self) -> None:
        integer("eval.every", self.every, low=0)
        integer("eval.val_batches", self.val_batches)
        if self.command is not None:
            string("eval.command", self.command, nonempty=True)


@dataclass(frozen=True)
class Checkpoint:
    every: int = 1000
    keep_last: int = 3
    keep_every: int = 0

    def check(self) -> None:
        integer("checkpoint.every", self.every, low=0)
        integer("checkpoint.keep_every", self.keep_every, low=0)
        integer("checkpoint.keep_last", self.keep_last, low=0)
        if self.keep_last < 1:
            raise RecipeError("checkpoint.keep_last must be at least 1 (the newest checkpoint is always kept)")


@dataclass(frozen=True)
class Sample:
    every: int = 0
    num: int = 4
    max_new_tokens: int = 32
    prompt: str = "Hello, I'm a language model,"

    def check(self) -> None:
        integer("sample.every", self.every, low=0)
        # Every sample is generated on every rank during training, one forward pass per new token: these bounds
        # keep a typo from stalling a run for hours at its first sample.
        integer("sample.num", self.num, low=0, high=1024)
        integer("sample.max_new_tokens", self.max_new_tokens, low=0, high=65536)
        string("sample.prompt", self.prompt)
        if self.every and not self.prompt:
            raise RecipeError("sample.prompt is empty while sample.every is on; give a prompt or set sample.every=0")


@dataclass(frozen=True)
class Log:
    every: int = 1
    tensorboard: bool = True
    # Weights & Biases (train.wandb_log): project default gpt2-pipeline, name default the run directory's name.
    wandb: bool = False
    wandb_project: str | None = None
    wandb_name: str | None = None
    wandb_entity: str | None = None

    def check(self) -> None:
        integer("log.every", self.every)
        boolean("log.tensorboard", self.tensorboard)
        boolean("log.wandb", self.wandb)
        for key in ("wandb_project", "wandb_name", "wandb_entity"):
            if getattr(self, key) is not None:
                string(f"log.{key}", getattr(self, key), nonempty=True)


@dataclass(frozen=True)
class Mfu:
    # Peak FLOP/s for MFU: gpu "auto" reads the CUDA device name; peak_tflops overrides the table.
    gpu: str = "auto"
    peak_tflops: float | None = None

    def check(self) -> None:
        string("mfu.gpu", self.gpu, nonempty=True)
        if self.peak_tflops is not None:
            number("mfu.peak_tflops", self.peak_tflops, low=1e-9, what="a positive number or null")


@dataclass(frozen=True)
class Recipe:
    run_dir: str = REQUIRED
    data: Data = field(default_factory=Data)
    model: GPTConfig = field(default_factory=GPTConfig)  # read by GPTConfig.from_dict: presets, its own checks
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
        recipe.check()
        return recipe

    @classmethod
    def from_saved(cls, values: dict, where: str) -> "Recipe":
        """A recipe this version saved (RUN/config.yaml, a checkpoint's client state); `where` names it in errors."""
        try:
            return cls.from_dict(values, where)
        except RecipeError as exc:
            raise RecipeError(f"{where}: {exc}") from None

    def to_dict(self) -> dict:
        """Plain types only (lists, not tuples): what config.yaml and the checkpoint's client state hold."""
        return _plain(self)

    # ---- validation ------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Every rule a recipe must meet to be run: each section's own, then those between sections; the first one
        broken is a RecipeError naming the key."""
        for key, value in flatten(_plain(self)).items():
            if value == REQUIRED:
                raise RecipeError(f"recipe key {key} is required")
        string("run_dir", self.run_dir, nonempty=True)
        string("deepspeed", self.deepspeed, nonempty=True)
        if self.init_from is not None:
            string("init_from", self.init_from, nonempty=True)
        self.data.check()
        choice("precision", self.precision, PRECISIONS)
        boolean("compile", self.compile)
        boolean("activation_checkpointing", self.activation_checkpointing)
        for section in (self.batch, self.optim, self.schedule, self.eval, self.checkpoint, self.sample, self.log,
                        self.mfu, self.heal):
            section.check()
        integer("seed", self.seed, low=0, high=MAX_SEED)
        # A week: longer than any rank-0-only step can take, so only a typo goes past it.
        integer("dist_timeout_minutes", self.dist_timeout_minutes, high=7 * 24 * 60)
        if self.batch.seq_len > self.model.block_size:
            raise RecipeError(f"batch.seq_len ({self.batch.seq_len}) exceeds the model's block_size "
                              f"({self.model.block_size})")
        if self.max_steps * self.batch.total_tokens > MAX_INT:
            raise RecipeError(f"{self.max_steps:,} updates of batch.total_tokens {self.batch.total_tokens:,} is more "
                              f"than 2^53 tokens; shorten schedule.max_steps / schedule.max_tokens")
        self.schedule.check_shape(self.max_steps, self.optim.warmup_steps)

    # ---- derived ---------------------------------------------------------------------------------------------
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
            raise RecipeError(f"unknown recipe key {shown(path)}; known keys here: {', '.join(fields)}")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING \
            else fields[key].default
        if isinstance(default, GPTConfig):  # the model section: GPTConfig's own reader (presets, its checks)
            if not isinstance(value, dict):
                raise RecipeError(f"{path} must be a mapping, got {shown(value)}")
            try:
                kwargs[key] = GPTConfig.from_dict(value)
            except (ModelConfigError, TypeError) as exc:
                raise RecipeError(f"model: {exc}") from None
        elif dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise RecipeError(f"{path} must be a mapping, got {shown(value)}")
            kwargs[key] = _build(type(default), value, f"{path}.")
        elif "items" in fields[key].metadata:  # a list of sections (data.mix)
            value = [] if value is None else value
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise RecipeError(f"{path} must be a list of mappings, got {shown(value)}")
            item = fields[key].metadata["items"]
            kwargs[key] = tuple(_build(item, v, f"{path}[{i}].") for i, v in enumerate(value))
        elif isinstance(value, list) and isinstance(default, tuple):  # optim.betas
            kwargs[key] = tuple(value)
        elif isinstance(value, (str, float)) and "int" in {t.strip() for t in str(fields[key].type).split("|")}:
            # A count written as people write them (512K, 10B, 1e8 — which YAML reads as a float), read as every
            # command's flags are; a fraction stays a float for the section's check to refuse.
            try:
                kwargs[key] = cli.parse_int(value) if isinstance(value, str) else \
                    int(value) if math.isfinite(value) and value.is_integer() else value
            except ValueError as exc:
                raise RecipeError(f"{path}: {exc}") from None
        else:
            kwargs[key] = value
    return cls(**kwargs)


def flatten(values: dict, where: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; the model section is flattened too (model.n_layer)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{where}{key}."))
        else:
            out[f"{where}{key}"] = value
    return out


def known_keys() -> list[str]:
    """Every settable dotted key except model.* (GPTConfig's, which --allow-change never takes)."""
    return [key for key in flatten(_plain(Recipe())) if not key.startswith("model.")]


# ---- the loader ----------------------------------------------------------------------------------------------

def parse_overrides(pairs: list[str]) -> dict:
    """`a.b=c` strings -> nested dict; values are parsed as YAML (numbers, true/false, null, lists)."""
    tree: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set expects key=value, got {shown(pair)}")
        try:
            value = yamlfile.parse(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            if not raw.lstrip().startswith(("{", "[")):
                value = raw  # text that is not YAML (`First Citizen: Hear me: speak`) is taken as text
            else:
                # A list or mapping with a typo (a key twice, a bracket left open) was taken as text, and refused
                # later as "batch must be a mapping, got '{...}'", which hid what was wrong with it.
                problem = ": ".join(filter(None, (getattr(exc, "context", None), getattr(exc, "problem", None))))
                raise RecipeError(f"--set {shown(pair)}: not valid YAML ({problem or str(exc).splitlines()[0]}); "
                                  f"a value starting with {{ or [ is a YAML mapping or list (quote it for text)") \
                    from None
        except RecursionError:  # PyYAML's composer recurses once per level of [[[...
            raise RecipeError(f"--set {shown(pair)}: not readable YAML (nested too deeply)") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {shown(key)}: {shown(part)} is set both as a value and as a section")
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


def recipe_changes(saved: Recipe, recipe: Recipe) -> dict[str, tuple]:
    """{dotted key: (checkpoint's value, this recipe's value)} for every compared key that differs. Both recipes
    have every key: a saved one was read by Recipe.from_saved, which fills in nothing and refuses unknown keys."""
    old, new = flatten(saved.to_dict()), flatten(recipe.to_dict())
    return {key: (old[key], new[key]) for key in old
            if old[key] != new[key] and key not in NOT_COMPARED and not key.startswith("model.")}


def check_resume(saved: Recipe, recipe: Recipe, allowed: list[str], checkpoint) -> dict[str, tuple]:
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
    grad_accum = b.total_tokens // per_micro_step
    if grad_accum > MAX_GRAD_ACCUM:
        raise RecipeError(f"batch.total_tokens {b.total_tokens:,} takes {grad_accum:,} micro steps per update on "
                          f"{world_size} rank(s) (micro_batch {b.micro_batch} x seq_len {b.seq_len}); at most "
                          f"{MAX_GRAD_ACCUM:,}: lower batch.total_tokens or raise batch.micro_batch")
    return BatchPlan(b.micro_batch, b.seq_len, grad_accum, world_size, b.total_tokens, recipe.max_steps)


def read_deepspeed_file(recipe: Recipe) -> dict:
    """The DeepSpeed JSON the recipe names, as written (deepspeed_config fills it in)."""
    path = Path(recipe.deepspeed)
    try:
        ds = files.read_json(path, error=RecipeError)
    except OSError as exc:
        raise RecipeError(f"deepspeed config {path}: {exc.strerror}") from None
    if not isinstance(ds, dict):
        raise RecipeError(f"deepspeed config {path}: a JSON object is expected, got {type(ds).__name__}")
    # The sections the trainer reads itself (zero_stage, optimizer_offload, precision): checked here, or a bad one
    # is a traceback from DeepSpeed's own validation after the run directory is locked.
    for key in ("zero_optimization", "bf16", "fp16", "data_types"):
        if not isinstance(ds.get(key, {}), dict):
            raise RecipeError(f"deepspeed config {path}: {key} must be a JSON object, got {shown(ds[key])}")
    zo = ds.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if not isinstance(zo.get(key, {}), dict):
            raise RecipeError(f"deepspeed config {path}: zero_optimization.{key} must be a JSON object, "
                              f"got {shown(zo[key])}")
    stage = zo.get("stage", 0)
    if not (isinstance(stage, int) and not isinstance(stage, bool) and 0 <= stage <= 3):
        raise RecipeError(f"deepspeed config {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {shown(stage)}")
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
            raise RecipeError(f"deepspeed config {path} sets {key}={shown(ds[key])} but the recipe gives {value!r}; "
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
    check_deepspeed(recipe.optim, recipe.precision, ds, path)
    if recipe.compile and zero_stage(ds) == 3:
        # Measured (2 CPU ranks): it trains, but dynamo traces into ZeRO-3's per-module parameter gather/release
        # hooks, hits its recompile limit and falls back to eager there, so compiling buys nothing and costs a
        # minute. DeepSpeed's route for ZeRO-3 is its DeepCompile backend, not wired in here.
        raise RecipeError(f"compile: true with ZeRO stage 3 ({path}) is not supported; use ZeRO 0-2 or compile: false")
    ds.setdefault("steps_per_print", 10 ** 9)  # our own metrics replace DeepSpeed's periodic prints
    # DeepSpeed's throughput timer (on unless told) synchronizes the GPU at the start and end of every micro step,
    # so the host never runs ahead of it; the trainer measures tokens/s itself.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    ds["wall_clock_breakdown"] = False
    return ds


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
    return cli.table(rows)
