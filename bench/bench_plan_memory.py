"""Check `python -m model plan`'s memory estimate against one real training step.

    # GPU (one device): the trainer's DeepSpeed bf16 engine and optimizer, two updates, torch.cuda.max_memory_allocated
    python bench/bench_plan_memory.py --device cuda --model gpt2 --micro-batch 16 --seq-len 1024 \
        --deepspeed configs/deepspeed/zero1.json
    # CPU: the activation part only, as the rise of peak RSS over one forward + backward of the bf16 model
    python bench/bench_plan_memory.py --device cpu --model tiny --micro-batch 8 --seq-len 256

On CUDA the estimate compared is everything the plan puts in torch's allocator (model states, activations,
DeepSpeed buckets): its total less the fragmentation and CUDA-runtime allowances, which
max_memory_allocated does not see. On CPU it is the plan's activations: gradients are allocated before
the measured step, so the peak RSS rise is the activations and the loss's temporaries alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys

import torch

from model.config import GPTConfig
from model.gpt import GPT
from train.plan import plan_from_argv


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def batch(config: GPTConfig, micro_batch: int, seq_len: int, device: str):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (micro_batch, seq_len + 1), generator=g)
    return idx[:, :-1].to(device), idx[:, 1:].to(device)


def measure_cpu(config: GPTConfig, micro_batch: int, seq_len: int) -> int:
    """Bytes the peak RSS rises by during one forward + backward of the bf16 model (grads pre-allocated).
    Large tensors come from mmap and go back to the OS when freed, so RSS follows the live tensors."""
    torch.manual_seed(0)
    model = GPT(config).to(torch.bfloat16).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    x, y = batch(config, micro_batch, seq_len, "cpu")
    prior_peak, base = peak_rss(), current_rss()
    logits, loss = model(x, y)
    loss.backward()
    peak = peak_rss()
    if peak <= prior_peak:
        raise RuntimeError("the step never rose above the process's earlier peak RSS: use a larger micro batch")
    del logits
    return peak - base


def trainer_engine(model: str, micro_batch: int, seq_len: int, deepspeed_path: str, device: str):
    """(engine, optimizer) as Trainer.build makes them for a one-device bf16 run of this shape: train.recipe's
    DeepSpeed config (it refuses an optimizer section, so DeepSpeed never JIT-builds its FusedAdam with nvcc) and
    train.optim.build's optimizer (torch's AdamW, fused) handed to deepspeed.initialize."""
    import deepspeed

    from train import optim
    from train.optim import optimizer_offload, zero_stage
    from train.recipe import Recipe, batch_plan, deepspeed_config
    recipe = Recipe.from_dict({
        "run_dir": "unused", "data": {"dir": "unused"}, "model": {"preset": model}, "deepspeed": deepspeed_path,
        "precision": "bf16", "schedule": {"max_steps": 2},
        "batch": {"total_tokens": micro_batch * seq_len, "micro_batch": micro_batch, "seq_len": seq_len}},
        "bench_plan_memory")
    ds_config = deepspeed_config(recipe, batch_plan(recipe, 1))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29531")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    torch.manual_seed(0)
    model = GPT(recipe.model)
    built = optim.build(model, recipe.optim, device, offload=optimizer_offload(ds_config))
    engine, *_ = deepspeed.initialize(model=model, optimizer=built.optimizer, config=ds_config)
    optim.forget_start_up_step(built.optimizer, zero_stage(ds_config), True)
    optim.set_lr(built.optimizer, built.peak_lrs, 1.0)
    return engine, built.optimizer


def measure_cuda(model: str, config: GPTConfig, micro_batch: int, seq_len: int, deepspeed_path: str) -> int:
    """torch.cuda.max_memory_allocated over two updates of the trainer's engine (trainer_engine) on one GPU."""
    engine, _ = trainer_engine(model, micro_batch, seq_len, deepspeed_path, "cuda")
    x, y = batch(config, micro_batch, seq_len, engine.device)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # Adam's moments appear in the first step; the second shows the steady state
        logits, loss = engine(x, y)  # held through backward, as train/'s loop holds them
        engine.backward(loss)
        engine.step()
        del logits, loss
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--deepspeed", default="configs/deepspeed/zero1.json", help="cuda: the engine's config")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    config = GPTConfig.resolve(args.model)
    seq_len = args.seq_len or config.block_size
    # One GPU, as measured; capacity and speed do not enter the memory estimate.
    plan = plan_from_argv(["--model", args.model, "--micro-batch", str(args.micro_batch), "--seq-len", str(seq_len),
                           "--gpus", "1", "--deepspeed", args.deepspeed])
    mem, detail = plan["memory_per_gpu"], plan["memory_detail"]
    if args.device == "cpu":
        estimate, measured = mem["activations"], measure_cpu(config, args.micro_batch, seq_len)
        what = "activations vs peak RSS rise"
    else:
        estimate = mem["total"] - detail["allocator_fragmentation"] - detail["cuda_runtime"]
        measured = measure_cuda(args.model, config, args.micro_batch, seq_len, args.deepspeed)
        what = f"allocated ({args.deepspeed}) vs torch.cuda.max_memory_allocated"
    result = {"device": args.device, "model": args.model, "micro_batch": args.micro_batch, "seq_len": seq_len,
              "deepspeed": args.deepspeed, "estimate_bytes": int(estimate), "measured_bytes": int(measured),
              "ratio": estimate / measured}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} micro batch {args.micro_batch} x {seq_len}, {what}: estimate "
              f"{estimate / 2**30:.3f} GiB, measured {measured / 2**30:.3f} GiB, ratio {result['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
