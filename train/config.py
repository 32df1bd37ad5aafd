"""The training recipe: YAML + `--set a.b=c` overrides -> one validated, resolved dict.

Every key a recipe may hold is listed in DEFAULTS (a value of REQUIRED must be given); any other key is an error.
`model:` is free-form here and validated by model.GPTConfig.from_dict.
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.errors import UsageError
from model.config import ConfigError as ModelConfigError
from model.config import GPTConfig


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` and `3e30` as strings; recipes and --set values mean numbers (as YAML 1.2 does)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class RecipeError(UsageError):
    """A recipe that cannot run; the message names the key and the problem (exit 2, like a bad flag)."""


REQUIRED = "<required>"

DEFAULTS: dict = {
    "run_dir": REQUIRED,
    "data": {"dir": REQUIRED},
    "model": {},
    "deepspeed": REQUIRED,
    # bf16 on GPUs (the DeepSpeed files enable it); fp32 for CPU runs, where bf16 matmuls are ~10x slower.
    "precision": "bf16",
    # Speed/memory switches of the training forward; neither changes the weights, the checkpoints or their keys.
    # compile: torch.compile the module in place (DeepSpeed's engine.compile); not with ZeRO-3.
    # activation_checkpointing: recompute each block in backward instead of keeping its activations.
    "compile": False,
    "activation_checkpointing": False,
    "batch": {"total_tokens": REQUIRED, "micro_batch": REQUIRED, "seq_len": REQUIRED},
    "optim": {"max_lr": 6.0e-4, "min_lr_ratio": 0.1, "warmup_steps": 0, "weight_decay": 0.1,
              "betas": [0.9, 0.95], "eps": 1.0e-8, "grad_clip": 1.0},
    # Exactly one of max_steps / max_tokens; max_tokens is rounded up to whole steps.
    "schedule": {"max_steps": None, "max_tokens": None},
    "eval": {"every": 250, "val_batches": 20, "command": None},
    "checkpoint": {"every": 1000, "keep_last": 3, "keep_every": 0, "export_live_fp32": False},
    "sample": {"every": 0, "num": 4, "max_new_tokens": 32, "prompt": "Hello, I'm a language model,"},
    "log": {"every": 1, "tensorboard": True},
    # Peak FLOP/s for MFU: gpu "auto" reads the CUDA device name; peak_tflops overrides the table.
    "mfu": {"gpu": "auto", "peak_tflops": None},
    "seed": 1337,
}

# Sections whose keys are not fixed by DEFAULTS.
FREE_SECTIONS = {"model"}


def _merge(base: dict, update: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in base:
            known = ", ".join(base) if base else "(none)"
            raise RecipeError(f"unknown recipe key {path!r}; known keys here: {known}")
        if path in FREE_SECTIONS:
            if not isinstance(value, dict):
                raise RecipeError(f"{path} must be a mapping, got {value!r}")
            out[key] = {**out[key], **value}
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise RecipeError(f"{path} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, f"{path}.")
        else:
            out[key] = value
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """`a.b=c` strings -> nested dict; values are parsed as YAML (numbers, true/false, null, lists)."""
    tree: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set expects key=value, got {pair!r}")
        try:
            value = _yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return tree


def load_recipe(path, overrides: list[str] | None = None) -> dict:
    path = Path(path)
    try:
        raw = _yaml(path.read_text()) or {}
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    recipe = _merge(DEFAULTS, raw)
    recipe = _merge(DEFAULTS, _deep_update(recipe, parse_overrides(overrides or [])))
    _check(recipe)
    return recipe


def _deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def _positive_int(recipe: dict, dotted: str, allow_zero: bool = False) -> int:
    node = recipe
    for part in dotted.split("."):
        node = node[part]
    ok = isinstance(node, int) and not isinstance(node, bool) and (node >= 0 if allow_zero else node > 0)
    if not ok:
        raise RecipeError(f"{dotted} must be a {'non-negative' if allow_zero else 'positive'} integer, got {node!r}")
    return node


def _check(recipe: dict) -> None:
    def missing(node, where=""):
        for key, value in node.items():
            if value == REQUIRED:
                raise RecipeError(f"recipe key {where}{key} is required")
            if isinstance(value, dict) and f"{where}{key}" not in FREE_SECTIONS:
                missing(value, f"{where}{key}.")
    missing(recipe)
    for key in ("batch.total_tokens", "batch.micro_batch", "batch.seq_len", "log.every", "eval.val_batches"):
        _positive_int(recipe, key)
    for key in ("optim.warmup_steps", "eval.every", "checkpoint.every", "checkpoint.keep_last",
                "checkpoint.keep_every", "sample.every", "sample.num", "sample.max_new_tokens", "seed"):
        _positive_int(recipe, key, allow_zero=True)
    for key in ("compile", "activation_checkpointing"):
        if not isinstance(recipe[key], bool):
            raise RecipeError(f"{key} must be true or false, got {recipe[key]!r}")
    if recipe["precision"] not in ("bf16", "fp32"):
        raise RecipeError(f"precision must be bf16 or fp32, got {recipe['precision']!r}")
    optim = recipe["optim"]
    for key in ("max_lr", "min_lr_ratio", "weight_decay", "eps", "grad_clip"):
        value = optim[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise RecipeError(f"optim.{key} must be a non-negative number, got {value!r}")
    if optim["min_lr_ratio"] > 1:
        raise RecipeError(f"optim.min_lr_ratio must be in [0, 1], got {optim['min_lr_ratio']}")
    betas = optim["betas"]
    if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1
                                                                 for b in betas)):
        raise RecipeError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
    schedule = recipe["schedule"]
    if (schedule["max_steps"] is None) == (schedule["max_tokens"] is None):
        raise RecipeError("give exactly one of schedule.max_steps and schedule.max_tokens")
    for key in ("max_steps", "max_tokens"):
        if schedule[key] is not None:
            _positive_int(recipe, f"schedule.{key}")
    if recipe["eval"]["command"] is not None and not isinstance(recipe["eval"]["command"], str):
        raise RecipeError(f"eval.command must be a string or null, got {recipe['eval']['command']!r}")
    if recipe["checkpoint"]["keep_last"] < 1:
        raise RecipeError("checkpoint.keep_last must be at least 1 (the newest checkpoint is always kept)")
    mfu = recipe["mfu"]
    if mfu["peak_tflops"] is not None and (not isinstance(mfu["peak_tflops"], (int, float)) or mfu["peak_tflops"] <= 0):
        raise RecipeError(f"mfu.peak_tflops must be a positive number or null, got {mfu['peak_tflops']!r}")
    model_config(recipe)  # raises on a bad model section
    seq_len = recipe["batch"]["seq_len"]
    block = model_config(recipe).block_size
    if seq_len > block:
        raise RecipeError(f"batch.seq_len ({seq_len}) exceeds the model's block_size ({block})")


def model_config(recipe: dict) -> GPTConfig:
    try:
        return GPTConfig.from_dict(recipe["model"])
    except (ModelConfigError, TypeError) as exc:
        raise RecipeError(f"model: {exc}") from None


@dataclass(frozen=True)
class BatchPlan:
    """total_tokens = micro_batch x seq_len x grad_accum x world_size, exactly."""
    micro_batch: int
    seq_len: int
    grad_accum: int
    world_size: int
    total_tokens: int
    max_steps: int


def batch_plan(recipe: dict, world_size: int) -> BatchPlan:
    b = recipe["batch"]
    per_micro_step = b["micro_batch"] * b["seq_len"] * world_size
    if b["total_tokens"] % per_micro_step:
        raise RecipeError(
            f"batch.total_tokens {b['total_tokens']} is not a multiple of micro_batch {b['micro_batch']} x seq_len "
            f"{b['seq_len']} x world_size {world_size} = {per_micro_step} "
            f"({b['total_tokens']} / {per_micro_step} = {b['total_tokens'] / per_micro_step:.4g}); "
            f"change batch.total_tokens or batch.micro_batch")
    schedule = recipe["schedule"]
    max_steps = schedule["max_steps"] or -(-schedule["max_tokens"] // b["total_tokens"])
    return BatchPlan(b["micro_batch"], b["seq_len"], b["total_tokens"] // per_micro_step, world_size,
                     b["total_tokens"], max_steps)


def deepspeed_config(recipe: dict, plan: BatchPlan) -> dict:
    """The DeepSpeed JSON named by the recipe, with batch sizes, clipping and precision filled in from it.

    Batch keys and gradient_clipping come only from the recipe: a DeepSpeed file that sets them differently is an
    error rather than a silent second source of truth.
    """
    path = Path(recipe["deepspeed"])
    try:
        ds = json.loads(path.read_text())
    except OSError as exc:
        raise RecipeError(f"deepspeed config {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise RecipeError(f"deepspeed config {path}: not valid JSON ({exc})") from None
    filled = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.micro_batch * plan.grad_accum * plan.world_size,
        "gradient_clipping": float(recipe["optim"]["grad_clip"]),
    }
    for key, value in filled.items():
        if key in ds and ds[key] not in ("auto", value):
            raise RecipeError(f"deepspeed config {path} sets {key}={ds[key]!r} but the recipe gives {value!r}; "
                              f"remove it from the JSON (the trainer fills it in)")
        ds[key] = value
    if recipe["precision"] == "fp32":
        ds["bf16"] = {"enabled": False}
        ds.get("data_types", {}).pop("grad_accum_dtype", None)
    else:
        ds.setdefault("bf16", {})["enabled"] = True
    if ds.get("fp16", {}).get("enabled"):
        raise RecipeError(f"deepspeed config {path} enables fp16; this trainer uses bf16 or fp32 (recipe precision)")
    if recipe["compile"] and zero_stage(ds) == 3:
        # Measured (2 CPU ranks): it trains, but dynamo traces into ZeRO-3's per-module parameter gather/release
        # hooks, hits its recompile limit and falls back to eager there, so compiling buys nothing and costs a
        # minute. DeepSpeed's route for ZeRO-3 is its DeepCompile backend, not wired in here.
        raise RecipeError(f"compile: true with ZeRO stage 3 ({path}) is not supported; use ZeRO 0-2 or compile: false")
    ds.setdefault("steps_per_print", 10 ** 9)  # our own metrics replace DeepSpeed's periodic prints
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def startup_table(recipe: dict, plan: BatchPlan, ds_config: dict, n_params: int, compiled: bool = False,
                  checkpointing: bool = False) -> str:
    """The resolved recipe, then derived numbers; compiled / checkpointing are read back from the built engine."""
    rows = [("recipe key", "value")]

    def walk(node, where=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{where}{key}.")
            else:
                rows.append((f"{where}{key}", json.dumps(value) if not isinstance(value, str) else value))
    walk(recipe)
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
