"""`python -m model plan`: will a run fit on these GPUs, how long will it take, what will it cost?

Memory is modelled the way DeepSpeed lays out bf16 mixed-precision training with Adam (the same byte
counts as its own ZeRO estimators), activations are the tensors this repository's model/gpt.py saves for
backward, and compute is model/flops.py's FLOPs per token (the formula train's MFU uses).
See docs/plan.md for every formula and its source.

It lives in train/ because it plans training runs: `--recipe` goes through train.recipe, so steps, tokens, batch
arithmetic and the DeepSpeed config are the ones `python -m train` computes. `python -m model plan` is its command.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common import cli, yamlfile
from common.errors import UsageError
from common.hardware import GPUS, GPUSpec, gpu_spec

from model.config import PRESETS, ConfigError, GPTConfig
from model.flops import attention_flops_per_token, flops_per_token, matmul_params
from model.info import parameter_table

from .recipe import batch_plan, deepspeed_config
from .recipe import load as load_recipe

GiB = 1024 ** 3
CHINCHILLA_TOKENS_PER_PARAM = 20          # Hoffmann et al. 2022: compute-optimal D ~ 20 N
ACT_BYTES = 2                             # bf16 activations (DeepSpeed's bf16 mode casts the module)
# Bytes of a weight, gradient and activation as the module holds them, by the recipe's precision.
VALUE_BYTES = {"bf16": ACT_BYTES, "fp32": 4}
CUDA_RUNTIME_BYTES = 1 * GiB              # CUDA context, cuBLAS workspace, NCCL buffers: outside torch's allocator
FRAGMENTATION = 0.10                      # caching-allocator slack on top of what tensors occupy
DS_REDUCE_BUCKET = 500_000_000            # DeepSpeed's default reduce_bucket_size (elements)
DS_PREFETCH_BUCKET = 50_000_000           # DeepSpeed's default stage3_prefetch_bucket_size (elements)
DS_CPU_BUFFER_FACTOR = 1.5                # DeepSpeed estimators' additional_buffer_factor for CPU memory
MAX_MICRO_BATCH = 1 << 16                 # search ceiling for the largest micro batch that fits
MAX_GPUS = 1_000_000                      # far beyond any cluster; keeps a typo (1e30) from planning as if real
MAX_GPU_FIGURE = 1_000_000                # GiB or TFLOP/s of one custom GPU: far above any device, finite arithmetic


class PlanError(UsageError):
    """Flags (or a recipe) that describe no possible run: a usage error, exit 2; the message names the flag."""


# ---------------------------------------------------------------------------------------------------
# Model states: bf16 weights, gradients, fp32 master weights and Adam moments, partitioned by ZeRO.

def model_state_bytes(n_params: int, largest_layer: int, zero: int, gpus: int,
                      offload: bool = False, offload_params: bool = False, fp32_grad_accum: bool = False,
                      precision: str = "bf16") -> dict:
    """Bytes of model states per GPU and per rank on the CPU, as DeepSpeed's ZeRO allocates them.

    Per parameter: bf16 weight 2, bf16 gradient 2, fp32 gradient 4 (DeepSpeed converts the reduced
    gradient partition to fp32 before the step), fp32 master 4, Adam m and v 8. ZeRO-1 partitions the
    fp32 gradient, master and moments across the data-parallel GPUs, ZeRO-2 also the bf16 gradients,
    ZeRO-3 also the bf16 weights; ZeRO-3 then gathers one layer at a time, so the largest layer's bf16
    weights and gradients (2 + 2 bytes each) are whole on every GPU, and (as DeepSpeed's own estimator
    has it) its partitioned gradient is counted once, in fp32: 18 bytes per parameter per GPU.
    Offload keeps the fp32 gradient, master and moments on the CPU (and the bf16 gradient partition
    lands there directly); offload_params (ZeRO-3) also keeps the bf16 weight partition there.
    fp32_grad_accum at ZeRO-1 is DeepSpeed's BF16_Optimizer (data_types.grad_accum_dtype fp32): it keeps
    bf16 gradients until backward ends and then accumulates them into a full, unpartitioned fp32 buffer.
    precision fp32 (DeepSpeed with bf16 off, as CPU recipes run): weights and gradients take 4 bytes; ZeRO 1-3
    still keep their fp32 partition of the weights (a copy) and of the gradient; at ZeRO-0 torch's AdamW
    updates the weights in place, so there is only m and v (8 bytes). Not checked against DeepSpeed's own
    estimators, which model mixed precision only.
    """
    N, G = n_params, gpus
    W = VALUE_BYTES[precision]

    def shard(nbytes: int, from_stage: int) -> float:
        return nbytes * N / G if zero >= from_stage else nbytes * N
    gathered = W * largest_layer if zero == 3 else 0
    # DeepSpeed's ZeRO-3 estimator counts no bf16 gradient partition (18 bytes/param/GPU); we keep its count.
    bf16_grads = (shard(W, 2) if zero < 3 else 0) + gathered
    if precision == "fp32" and zero == 0:
        fp32_grads, optimizer = 0.0, 8.0 * N
    else:
        fp32_grads, optimizer = (4 * N if fp32_grad_accum else shard(4, 1)), shard(12, 1)
    gpu = {"weights": shard(W, 3) + gathered, "gradients": bf16_grads + fp32_grads, "optimizer": optimizer}
    cpu = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0}
    if offload:
        cpu["optimizer"] = 12 * N / G                     # fp32 master + Adam m, v
        cpu["gradients"] = 4 * N / G                      # fp32 gradient partition the CPU Adam reads
        gpu["optimizer"] = 0.0
        # ZeRO-2/3 stream each reduced bucket straight to the CPU; ZeRO-1 still accumulates in param.grad.
        gpu["gradients"] = gathered if zero >= 2 else bf16_grads
    if offload_params:
        cpu["weights"] = W * N / G
        gpu["weights"] = gathered
    return {"gpu": {k: int(v) for k, v in gpu.items()}, "cpu_per_rank": {k: int(v) for k, v in cpu.items()}}


def cpu_bytes_per_node(n_params: int, states_per_rank: dict, gpus_per_node: int) -> dict:
    """CPU memory per node: the offloaded states of its ranks, or, if larger, the fp32 model every rank
    builds on the CPU before DeepSpeed takes it (no zero.Init), plus DeepSpeed's 1.5x buffer factor."""
    offloaded = sum(states_per_rank.values()) * gpus_per_node
    model_build = 4 * n_params * gpus_per_node
    peak = max(offloaded, model_build)
    buffers = (DS_CPU_BUFFER_FACTOR - 1) * peak
    return {"offloaded_states": int(offloaded), "model_build": int(model_build),
            "buffers": int(buffers), "total": int(peak + buffers)}


def largest_layer_params(config: GPTConfig) -> int:
    """The most parameters one module owns directly (DeepSpeed's ZeRO-3 estimator's 'largest layer'):
    the token embedding (shared with the LM head), or a block's MLP matrix if that is bigger."""
    C = config.n_embd
    return max(config.embedding_rows * C, 4 * C * C + (4 * C if config.bias else 0))


# ---------------------------------------------------------------------------------------------------
# Activations: what model/gpt.py saves for backward, per token, on a GPU with fused SDPA attention.

def block_activation_bytes_per_token(config: GPTConfig, act_bytes: int = ACT_BYTES) -> float:
    """One transformer block, bf16, flash / memory-efficient SDPA (no T x T matrix is kept).

    Saved tensors, in n_embd (C) units: ln_1 input 1, ln_1 output 1 (c_attn's input), q/k/v 3 (views of
    c_attn's output), attention output 1 (SDPA's output, which c_proj reads without a copy), ln_2 input 1,
    ln_2 output 1, c_fc output 4 (GELU's input), GELU output 4 (c_proj's input): 16 C at 2 bytes.
    Plus fp32 mean and rstd of both layernorms (16 bytes), SDPA's fp32 logsumexp (4 per head), and when
    dropout > 0 the two 1-byte dropout masks (attention-probability dropout is regenerated from the RNG).
    Korthikanti et al. 2022 count 34 C bytes per token with masks and without flash attention's savings.
    """
    C, H = config.n_embd, config.n_head
    masks = 2 * C if config.dropout > 0 else 0
    return 16 * C * act_bytes + 2 * 2 * 4 + 4 * H + masks


def head_activation_bytes_per_token(config: GPTConfig, act_bytes: int = ACT_BYTES) -> float:
    """Embeddings, final layernorm and loss: token ids 8, embedding dropout mask C (if dropout), ln_f input
    C x 2 bytes + 8 of stats, the loss's gradient of the features C x 2 bytes (gpt.py's chunked loss takes it in
    the forward and keeps no logits), targets 8. The loss's fp32 gradient of the head's weight is per run, not
    per token: see loss_weight_grad_bytes."""
    C = config.n_embd
    return 8 + (C if config.dropout > 0 else 0) + 2 * C * act_bytes + 8 + 8


def loss_weight_grad_bytes(config: GPTConfig) -> int:
    """The fp32 gradient of the LM head's weight the chunked loss keeps from its forward to backward."""
    return 4 * config.embedding_rows * config.n_embd


def loss_chunk_bytes(config: GPTConfig, tokens: int, act_bytes: int = ACT_BYTES) -> int:
    """One chunk of the loss at once (model.gpt.LOSS_CHUNK_LOGITS logits): the matmul's output, its fp32 copy,
    the fp32 softmax gradient and its cast to the matmul's dtype."""
    from model.gpt import LOSS_CHUNK_LOGITS
    rows = min(tokens, max(1, LOSS_CHUNK_LOGITS // config.embedding_rows))
    return rows * config.embedding_rows * (2 * act_bytes + 8)


def activation_bytes(config: GPTConfig, micro_batch: int, seq_len: int, checkpointing: bool,
                     act_bytes: int = ACT_BYTES) -> dict:
    """Saved-for-backward bytes and the transient peak on top of them at the start of backward.

    Transient: one chunk of the loss (loss_chunk_bytes), the only logits that ever exist.
    With activation checkpointing (one checkpoint per block, as Megatron's full recompute) only each
    block's input is kept (C x 2 bytes) and backward recomputes one block at a time, which then needs the
    larger of the loss chunk and one block's saved tensors. act_bytes 4 (fp32 runs) doubles the 2-byte
    tensors; the fp32 ones stay as they are.
    """
    tokens = micro_batch * seq_len
    block = block_activation_bytes_per_token(config, act_bytes)
    kept_per_block = config.n_embd * act_bytes if checkpointing else block
    saved = tokens * (config.n_layer * kept_per_block + head_activation_bytes_per_token(config, act_bytes)) \
        + 8 * seq_len + loss_weight_grad_bytes(config)
    chunk = loss_chunk_bytes(config, tokens, act_bytes)
    transient = max(chunk, tokens * block) if checkpointing else chunk
    return {"saved": int(saved), "transient": int(transient), "total": int(saved + transient)}


# ---------------------------------------------------------------------------------------------------
# The plan.

def deepspeed_settings(ds_config: dict, zero: int, fp32_grad_accum: bool = False) -> dict:
    """The DeepSpeed config values the memory model reads, with DeepSpeed's defaults where absent."""
    zo = ds_config.get("zero_optimization", {})
    return {"fp32_grad_accum": fp32_grad_accum,
            "reduce_bucket_size": int(zo.get("reduce_bucket_size", DS_REDUCE_BUCKET)),
            "overlap_comm": bool(zo.get("overlap_comm", zero == 3)),
            "prefetch_bucket_size": int(zo.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET))}


def deepspeed_bucket_bytes(zero: int, n_params: int, ds: dict, value_bytes: int = ACT_BYTES) -> int:
    """Gradient-reduction staging buffers. ZeRO 1-2 allocate a bf16 buffer of reduce_bucket_size elements
    up front, two with overlap_comm; ZeRO-3 one, plus up to stage3_prefetch_bucket_size prefetched
    weights. Stage 0 and BF16_Optimizer all-reduce the gradients in flattened chunks of up to 5e8 elements."""
    W = value_bytes  # the gradients' dtype: bf16, or fp32 for fp32 runs
    if zero == 0 or ds["fp32_grad_accum"]:
        return W * min(n_params, DS_REDUCE_BUCKET)
    if zero == 3:
        return W * ds["reduce_bucket_size"] + W * ds["prefetch_bucket_size"]
    return W * ds["reduce_bucket_size"] * (2 if ds["overlap_comm"] else 1)


def gpu_memory(config: GPTConfig, states: dict, micro_batch: int, seq_len: int, checkpointing: bool,
               buckets: int, act_bytes: int = ACT_BYTES) -> dict:
    act = activation_bytes(config, micro_batch, seq_len, checkpointing, act_bytes)
    tensors = sum(states.values()) + act["total"] + buckets
    fragmentation = int(FRAGMENTATION * tensors)
    buffers = buckets + fragmentation + CUDA_RUNTIME_BYTES
    memory = {**states, "activations": act["total"], "buffers": buffers}
    memory["total"] = sum(memory.values())
    detail = {"activations_saved": act["saved"], "activations_transient": act["transient"],
              "deepspeed_buckets": buckets, "allocator_fragmentation": fragmentation,
              "cuda_runtime": CUDA_RUNTIME_BYTES}
    return {"memory": memory, "detail": detail}


def count_params(config: GPTConfig) -> tuple[int, int]:
    """(parameters as `model info` counts them, parameters in memory incl. vocab padding)."""
    table = parameter_table(config)
    return table["total"], table["total"] + table["padding"]


def make_plan(config: GPTConfig, *, seq_len: int, micro_batch: int, gpus: int, gpus_per_node: int,
              gpu: GPUSpec, zero: int, offload: bool, offload_params: bool, checkpointing: bool,
              tokens: int | None, mfu: float, price_per_gpu_hour: float | None,
              deepspeed: dict | None = None, batch_tokens: int | None = None, precision: str = "bf16") -> dict:
    ds = deepspeed_settings({}, zero) if deepspeed is None else deepspeed
    W = VALUE_BYTES[precision]
    params, params_in_memory = count_params(config)
    states = model_state_bytes(params_in_memory, largest_layer_params(config), zero, gpus,
                               offload, offload_params, ds["fp32_grad_accum"], precision)
    buckets = deepspeed_bucket_bytes(zero, params_in_memory, ds, W)
    mem = gpu_memory(config, states["gpu"], micro_batch, seq_len, checkpointing, buckets, W)
    fits = mem["memory"]["total"] <= gpu.memory_bytes

    def fits_with(mb: int) -> bool:
        return gpu_memory(config, states["gpu"], mb, seq_len, checkpointing, buckets, W)["memory"]["total"] \
            <= gpu.memory_bytes
    lo, hi = 0, MAX_MICRO_BATCH           # memory grows with the micro batch: bisect the largest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits_with(mid) else (lo, mid - 1)

    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * params
    budget_from_chinchilla = tokens is None
    tokens = chinchilla if tokens is None else tokens
    per_token = flops_per_token(config, seq_len)
    flops = per_token * tokens
    hours = flops / (gpus * gpu.peak_bf16_flops * mfu) / 3600
    plan = {
        "model": config.to_dict(),
        "params": params,
        "params_in_memory": params_in_memory,
        "seq_len": seq_len, "micro_batch": micro_batch, "gpus": gpus, "gpus_per_node": gpus_per_node,
        "gpu": {"name": gpu.name, "memory_bytes": gpu.memory_bytes, "peak_bf16_flops": gpu.peak_bf16_flops},
        "precision": precision, "zero": zero, "offload": offload, "offload_params": offload_params, "deepspeed": ds,
        "activation_checkpointing": checkpointing,
        "tokens": int(tokens), "tokens_from_chinchilla": budget_from_chinchilla,
        "flops_per_token": per_token,
        "flops": flops,
        "flops_formula": (f"(6 * N_matmul + 12 * n_layer * n_embd * seq_len) * D = (6 * {matmul_params(config):,}"
                          f" + 12 * {config.n_layer} * {config.n_embd} * {seq_len}) * {int(tokens):,}"),
        "attention_flops_fraction": attention_flops_per_token(config, seq_len) / per_token,
        "chinchilla_tokens": chinchilla,
        "chinchilla_ratio": tokens / chinchilla,
        "memory_per_gpu": mem["memory"],
        "memory_detail": mem["detail"],
        "cpu_memory_per_node": cpu_bytes_per_node(params_in_memory, states["cpu_per_rank"], gpus_per_node),
        "fits": fits,
        "max_micro_batch": lo,
        "mfu": mfu,
        "hours": hours,
        "gpu_hours": hours * gpus,
        "price_per_gpu_hour": price_per_gpu_hour,
        "cost": None if price_per_gpu_hour is None else hours * gpus * price_per_gpu_hour,
    }
    if batch_tokens is not None:
        plan["batch_tokens"] = batch_tokens
        plan["grad_accum_steps"] = batch_tokens // (micro_batch * seq_len * gpus)
        plan["steps"] = math.ceil(tokens / batch_tokens)
    return plan


# ---------------------------------------------------------------------------------------------------
# Command line.

def resolve_model(args) -> GPTConfig:
    """--model (preset or YAML, as `model info` reads it), then the shape flags on top."""
    if args.model_config is not None:  # the recipe's model, shape flags already applied as its overrides
        return args.model_config
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                                                "dropout") if getattr(args, k) is not None}
    config = GPTConfig.resolve(args.model)
    return GPTConfig.from_dict({**config.to_dict(), **overrides}) if overrides else config


def read_mapping(path: str, what: str) -> dict:
    """A JSON or YAML file holding one mapping (YAML is a superset of JSON), or a PlanError naming it.

    Through the one YAML rule, so a DeepSpeed JSON's `"reduce_bucket_size": 5e8` is a number here too."""
    import yaml
    try:
        values = yamlfile.parse(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PlanError(f"cannot read {what} {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise PlanError(f"{path} is not a {what} (a mapping)")
    return values


def resolve_deepspeed(args) -> tuple[int, bool, bool, dict]:
    """(ZeRO stage, offload, offload_params, deepspeed_settings) from the DeepSpeed config train builds from the
    recipe, or else --deepspeed FILE; flags override it."""
    if args.ds_config is not None:
        ds_config = args.ds_config
    else:
        ds_config = read_mapping(args.deepspeed, "DeepSpeed config") if args.deepspeed else {}
    zo = ds_config.get("zero_optimization", {})
    zero = args.zero if args.zero is not None else zo.get("stage", 0 if args.deepspeed else 1)
    if zero not in range(4):
        raise PlanError(f"ZeRO stage must be 0-3, got {zero}")
    offload = args.offload or zo.get("offload_optimizer", {}).get("device") == "cpu"
    offload_params = args.offload_params or zo.get("offload_param", {}).get("device") == "cpu"
    accum = args.grad_accum_dtype or ds_config.get("data_types", {}).get("grad_accum_dtype", "bf16")
    if accum not in ("bf16", "fp32"):
        raise PlanError(f"gradient accumulation dtype must be bf16 or fp32, got {accum!r}")
    if accum == "fp32" and (zero != 1 or offload):
        raise PlanError("fp32 gradient accumulation is modelled for ZeRO-1 without offload only "
                        "(DeepSpeed's BF16_Optimizer)")
    try:
        return zero, offload, offload_params, deepspeed_settings(ds_config, zero, accum == "fp32")
    except (TypeError, ValueError) as exc:  # e.g. "auto", which only the HF Trainer integration fills in
        raise PlanError(f"{args.deepspeed}: a bucket size or overlap_comm is not a number ({exc})") from None


def resolve_gpu(args) -> GPUSpec:
    custom = args.gpu_memory_gb is not None or args.gpu_tflops is not None
    try:
        base = gpu_spec(args.gpu)
    except UsageError:
        if not (args.gpu_memory_gb is not None and args.gpu_tflops is not None):
            raise PlanError(f"unknown GPU kind {args.gpu!r}; known: {', '.join(GPUS)} "
                            "(or give both --gpu-memory-gb and --gpu-tflops)") from None
        base = GPUSpec(args.gpu, 0, 0.0)
    if not custom:
        return base
    for flag, value in (("--gpu-memory-gb", args.gpu_memory_gb), ("--gpu-tflops", args.gpu_tflops)):
        # bounded far above any device, so the byte and FLOP arithmetic stays finite
        if value is not None and not 0 < value <= MAX_GPU_FIGURE:
            raise PlanError(f"{flag} must be positive and at most {MAX_GPU_FIGURE:,}, got {value}")
    memory = base.memory_bytes if args.gpu_memory_gb is None else int(args.gpu_memory_gb * GiB)
    peak = base.peak_bf16_flops if args.gpu_tflops is None else args.gpu_tflops * 1e12
    return GPUSpec(base.name, memory, peak)


# Flags that stand for a recipe key when --recipe is given: they become `--set` overrides of it, so the
# recipe is planned through train's own loader, validation, batch arithmetic and DeepSpeed config.
RECIPE_FLAGS = {"micro_batch": "batch.micro_batch", "seq_len": "batch.seq_len", "batch_tokens": "batch.total_tokens",
                "deepspeed": "deepspeed", "n_layer": "model.n_layer", "n_head": "model.n_head",
                "n_embd": "model.n_embd", "block_size": "model.block_size", "vocab_size": "model.vocab_size",
                "dropout": "model.dropout"}


def recipe_overrides(args) -> list[str]:
    sets = [f"{key}={getattr(args, flag)}" for flag, key in RECIPE_FLAGS.items() if getattr(args, flag) is not None]
    if args.tokens is not None:  # as train reads schedule.max_tokens: rounded up to whole steps
        sets += ["schedule.max_steps=null", f"schedule.max_tokens={args.tokens}"]
    if args.steps is not None:
        sets += [f"schedule.max_steps={args.steps}", "schedule.max_tokens=null"]
    if args.activation_checkpointing:  # a flag can only turn recomputation on
        sets.append("activation_checkpointing=true")
    return [*args.set, *sets]


def apply_recipe(args) -> argparse.Namespace:
    """--recipe fills in everything a training recipe (configs/train/*.yaml) fixes, exactly as `python -m train`
    on --gpus ranks resolves it: model, micro batch, sequence length, tokens per step, steps (schedule.max_steps, or
    max_tokens rounded up to whole steps), activation checkpointing, precision and the DeepSpeed config train builds
    (ZeRO stage, offload, buckets). Flags override recipe keys (see RECIPE_FLAGS); --model replaces its model."""
    values = vars(args).copy()
    values.update(model_config=None, ds_config=None, precision="bf16")
    if args.recipe:
        if args.tokens is not None and args.steps is not None:
            raise PlanError("give either --tokens or --steps, not both")
        recipe = load_recipe(args.recipe, recipe_overrides(args))
        run = batch_plan(recipe, args.gpus)
        values.update(micro_batch=run.micro_batch, seq_len=run.seq_len, batch_tokens=run.total_tokens,
                      steps=run.max_steps, tokens=None, activation_checkpointing=recipe.activation_checkpointing,
                      precision=recipe.precision, ds_config=deepspeed_config(recipe, run), deepspeed=recipe.deepspeed)
        if args.model is None:
            values.update(model=args.recipe, model_config=recipe.model)
    elif args.set:
        raise PlanError("--set changes a recipe key: it needs --recipe")
    values["model"] = "gpt2" if values["model"] is None else values["model"]
    values["micro_batch"] = 1 if values["micro_batch"] is None else values["micro_batch"]
    return argparse.Namespace(**values)


def resolve(args) -> tuple[dict, str]:
    """Check every flag against the others; return (make_plan's keyword arguments, the model's name)."""
    args = apply_recipe(args)
    config = resolve_model(args)
    zero, offload, offload_params, ds = resolve_deepspeed(args)
    seq_len = config.block_size if args.seq_len is None else args.seq_len
    if seq_len <= 0:
        raise PlanError(f"--seq-len must be positive, got {seq_len}")
    if seq_len > config.block_size:
        raise PlanError(f"--seq-len {seq_len} exceeds the model's block_size {config.block_size}")
    if args.micro_batch <= 0:
        raise PlanError(f"--micro-batch must be positive, got {args.micro_batch}")
    if args.gpus <= 0:
        raise PlanError(f"--gpus must be at least 1, got {args.gpus}")
    gpus_per_node = min(args.gpus, 8) if args.gpus_per_node is None else args.gpus_per_node
    if gpus_per_node <= 0 or args.gpus % gpus_per_node:
        raise PlanError(f"--gpus {args.gpus} is not a whole number of nodes of {gpus_per_node} GPUs")
    if offload and zero == 0:
        raise PlanError("optimizer offload needs ZeRO stage 1, 2 or 3 (DeepSpeed offloads only partitioned states)")
    if offload_params and zero != 3:
        raise PlanError("parameter offload needs ZeRO stage 3 (only stage 3 partitions the weights)")
    if not 0 < args.mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.price_per_gpu_hour is not None and not 0 <= args.price_per_gpu_hour < math.inf:  # nan fails too
        raise PlanError(f"--price-per-gpu-hour must be a finite number >= 0, got {args.price_per_gpu_hour}")
    if args.gpus > MAX_GPUS:
        raise PlanError(f"--gpus must be at most {MAX_GPUS:,}, got {args.gpus:,}")
    tokens = args.tokens
    if args.steps is not None:
        if tokens is not None:
            raise PlanError("give either --tokens or --steps with --batch-tokens, not both")
        if args.batch_tokens is None:
            raise PlanError("--steps needs --batch-tokens (tokens per optimizer step)")
        if args.steps <= 0:
            raise PlanError(f"--steps must be positive, got {args.steps}")
        tokens = args.steps * args.batch_tokens
    if tokens is not None and tokens <= 0:
        raise PlanError(f"--tokens must be positive, got {tokens}")
    if args.batch_tokens is not None:
        per_step = args.micro_batch * seq_len * args.gpus
        if args.batch_tokens <= 0 or args.batch_tokens % per_step:
            raise PlanError(f"--batch-tokens {args.batch_tokens} is not a positive multiple of micro batch x "
                            f"seq len x GPUs = {per_step}")
    return dict(config=config, seq_len=seq_len, micro_batch=args.micro_batch, gpus=args.gpus,
                gpus_per_node=gpus_per_node, gpu=resolve_gpu(args), zero=zero,
                offload=offload or offload_params, offload_params=offload_params,
                checkpointing=args.activation_checkpointing, tokens=tokens, mfu=args.mfu,
                price_per_gpu_hour=args.price_per_gpu_hour, deepspeed=ds, batch_tokens=args.batch_tokens,
                precision=args.precision), args.model


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def gib(n: float) -> str:
    return f"{n / GiB:8.2f} GiB"


def format_plan(plan: dict, name: str) -> str:
    m, gpu = plan["model"], plan["gpu"]
    mem, detail, cpu = plan["memory_per_gpu"], plan["memory_detail"], plan["cpu_memory_per_node"]
    offload = "none" if not plan["offload"] else ("optimizer + params" if plan["offload_params"] else "optimizer")
    ds = plan["deepspeed"]
    optimizer = "BF16_Optimizer, fp32 gradient accumulation" if ds["fp32_grad_accum"] else \
        f"{plan['precision']} gradients"
    budget = "Chinchilla-optimal (no --tokens given)" if plan["tokens_from_chinchilla"] else \
        f"{plan['chinchilla_ratio']:.2f} x Chinchilla-optimal"
    rows = [
        ("model", f"{name}: n_layer {m['n_layer']}, n_head {m['n_head']}, n_embd {m['n_embd']}, "
                  f"vocab {m['vocab_size']}" + (f" (padded to {m['padded_vocab_size']})" if m["padded_vocab_size"]
                                                else "") + f", dropout {m['dropout']}"),
        ("parameters", f"{plan['params']:,}"),
        ("setup", f"{plan['gpus']} x {gpu['name']} ({plan['gpus_per_node']} per node), ZeRO-{plan['zero']}, "
                  f"{optimizer}, offload {offload}, "
                  f"activation checkpointing {'on' if plan['activation_checkpointing'] else 'off'}"),
        ("batch", f"micro batch {plan['micro_batch']} x seq len {plan['seq_len']}"
                  + (f", {plan['batch_tokens']:,} tokens/step (gradient accumulation {plan['grad_accum_steps']}, "
                     f"{plan['steps']:,} steps)" if "batch_tokens" in plan else "")),
        ("tokens", f"{plan['tokens']:,} ({human(plan['tokens'])}), {budget}"),
        ("Chinchilla tokens", f"{plan['chinchilla_tokens']:,} (20 per parameter)"),
        ("training FLOPs", f"{plan['flops']:.3e} = {plan['flops_formula']} "
                           f"(attention {100 * plan['attention_flops_fraction']:.1f}%)"),
        ("time", f"{plan['hours']:,.2f} h wall, {plan['gpu_hours']:,.1f} GPU-hours at MFU {plan['mfu']:.0%} of "
                 f"{gpu['peak_bf16_flops'] / 1e12:.0f} TFLOP/s"),
        ("cost", "-" if plan["cost"] is None else f"{plan['cost']:,.2f} at {plan['price_per_gpu_hour']} per GPU-hour"),
    ]
    lines = [cli.table(rows), "", "memory per GPU"]
    parts = [
        (f"weights ({plan['precision']})", mem["weights"]),
        (f"gradients ({plan['precision']} + fp32)", mem["gradients"]),
        ("optimizer (fp32 master + Adam m, v)", mem["optimizer"]),
        (f"activations ({detail['activations_saved'] / GiB:.2f} GiB saved + "
         f"{detail['activations_transient'] / GiB:.2f} GiB backward peak)", mem["activations"]),
        (f"buffers (DeepSpeed buckets, {FRAGMENTATION:.0%} fragmentation, CUDA runtime)", mem["buffers"]),
        ("total", mem["total"]),
        (f"{gpu['name']} capacity", gpu["memory_bytes"]),
    ]
    lines.append(cli.table([(k, gib(v)) for k, v in parts], indent="  "))
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines += ["", f"{verdict}; largest micro batch that fits: {plan['max_micro_batch']}",
              f"CPU memory per node: {cpu['total'] / GiB:.2f} GiB (offloaded states "
              f"{cpu['offloaded_states'] / GiB:.2f}, fp32 model built by each rank {cpu['model_build'] / GiB:.2f}, "
              f"x{DS_CPU_BUFFER_FACTOR} buffers)"]
    return "\n".join(lines)


def register(subparsers) -> None:
    p = cli.add_command(subparsers, "plan", run, help="size a training run: memory per GPU, FLOPs, time, cost",
                        description=__doc__)
    add_arguments(p)


def plan_from_argv(argv: list[str]) -> dict:
    """The plan `python -m model plan ARGV --json` prints, for scripts and benchmarks in Python."""
    parser = cli.Parser(prog="plan")
    add_arguments(parser)
    return make_plan(**resolve(parser.parse_args(argv))[0])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, metavar="RECIPE.yaml",
                   help="take model, DeepSpeed config, micro batch, seq len, tokens per step and steps from a "
                        "training recipe (configs/train/*.yaml); flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the --recipe, as for train (repeatable)")
    p.add_argument("--model", default=None, type=cli.preset_or_file(PRESETS), help="preset (default gpt2) or a YAML file (model keys, or a "
                                                   "recipe with a model: section)")
    for flag, kind in (("--n-layer", cli.count), ("--n-head", cli.count), ("--n-embd", cli.count),
                       ("--block-size", cli.count), ("--vocab-size", cli.count), ("--dropout", float)):
        p.add_argument(flag, type=kind, default=None, help="override the model's shape")
    p.add_argument("--seq-len", type=cli.count, default=None, help="tokens per sequence (default: block_size)")
    p.add_argument("--micro-batch", type=cli.count, default=None, help="sequences per GPU per forward (default 1)")
    p.add_argument("--gpus", type=cli.count, default=1, help="data-parallel GPUs in all")
    p.add_argument("--gpus-per-node", type=cli.count, default=None, help="default: min(gpus, 8)")
    p.add_argument("--gpu", default="h100", help=f"GPU kind: {', '.join(GPUS)} (default h100)")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="GPU memory in GiB (custom or override)")
    p.add_argument("--gpu-tflops", type=float, default=None, help="dense bf16 peak TFLOP/s (custom or override)")
    p.add_argument("--deepspeed", default=None, metavar="FILE.json",
                   help="read ZeRO stage, offload, bucket sizes and grad_accum_dtype from a DeepSpeed config "
                        "(e.g. configs/deepspeed/zero1.json); the flags below override it")
    p.add_argument("--zero", type=int, choices=range(4), default=None,
                   help="DeepSpeed ZeRO stage (default: the --deepspeed file's, else 1)")
    p.add_argument("--offload", action="store_true", help="optimizer states on the CPU (ZeRO-Offload)")
    p.add_argument("--offload-params", action="store_true", help="ZeRO-3: the weights on the CPU too")
    p.add_argument("--grad-accum-dtype", choices=("bf16", "fp32"), default=None,
                   help="gradient accumulation dtype (default: the --deepspeed file's, else bf16)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--tokens", type=cli.count, default=None,
                   help="training tokens, e.g. 10B (default: Chinchilla-optimal, 20 per parameter)")
    p.add_argument("--steps", type=cli.count, default=None, help="optimizer steps (with --batch-tokens)")
    p.add_argument("--batch-tokens", type=cli.count, default=None, help="tokens per optimizer step, e.g. 524288")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="for the cost line")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def run(args) -> int:
    try:
        kwargs, name = resolve(args)
    except ConfigError as exc:  # a model shape from the flags that cannot be built: a usage error too
        raise PlanError(str(exc)) from exc
    plan = make_plan(**kwargs)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan, name))
    return 0
