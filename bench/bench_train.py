"""Training throughput: the DeepSpeed trainer (`python -m train`) vs a plain PyTorch loop, side by side.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken .venv/bin/python bench/bench_train.py --dataset DS \
        [--preset tiny] [--micro-batch 4] [--seq-len 64] [--grad-accum 2] [--steps 20] [--precision bf16|fp32]

Both sides train the same model shape from the same seed on the same windows of DS with the same optimizer
(AdamW, decay on 2-D parameters, clipping 1.0, lr set per step) and the same batch. The plain loop uses bf16 autocast
when --precision bf16 (fp32 master weights); the trainer runs DeepSpeed ZeRO-1 with the recipe's precision
(bf16 module weights with fp32 master weights and fp32 gradient accumulation, or fp32). tokens/s is the median over
the steps after --skip warm-up steps; the trainer's figure is read from its metrics.jsonl (DeepSpeed start-up and
checkpoint writing are excluded on both sides). The two alternate --rounds times to even out a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402
from prep.reader import Dataset  # noqa: E402
from train.data import TrainLoader  # noqa: E402
from train.trainer import param_groups  # noqa: E402


def plain_loop(args) -> list[float]:
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig.preset(args.preset))
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    loader = TrainLoader(Dataset(args.dataset), args.micro_batch, args.seq_len, 0, 1, args.seed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    rates = []
    for _ in range(args.steps):
        start = time.perf_counter()
        for _ in range(args.grad_accum):
            x, y = loader.next()
            with autocast:
                _, loss = model(x, y)
            (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(args.micro_batch * args.seq_len * args.grad_accum / (time.perf_counter() - start))
    return rates


def deepspeed_trainer(args) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"run_dir={tmp}/run", f"data.dir={args.dataset}", f"model={{preset: {args.preset}}}",
                f"precision={args.precision}", f"batch.micro_batch={args.micro_batch}",
                f"batch.seq_len={args.seq_len}", f"batch.total_tokens={args.micro_batch * args.seq_len * args.grad_accum}",
                f"schedule.max_steps={args.steps}", "eval.every=0", "sample.every=0", "checkpoint.every=0",
                "log.tensorboard=false", f"seed={args.seed}", "deepspeed=configs/deepspeed/zero1.json"]
        cmd = [sys.executable, "-m", "train", "--config", "configs/train/tiny-cpu.yaml"]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        return [r["tokens_per_s"] for r in lines if "loss" in r]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="a finished prep dataset dir")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the median")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    results = {"plain": [], "deepspeed": []}
    for _ in range(args.rounds):
        for name, fn in (("plain", plain_loop), ("deepspeed", deepspeed_trainer)):
            rates = fn(args)[args.skip:]
            results[name].append(statistics.median(rates))
            print(f"{name:9s} median {results[name][-1]:10.1f} tok/s over {len(rates)} steps", flush=True)
    plain, ds = statistics.median(results["plain"]), statistics.median(results["deepspeed"])
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"preset {args.preset}, micro_batch {args.micro_batch} x seq_len {args.seq_len} x grad_accum "
          f"{args.grad_accum}, {args.precision}, {args.steps} steps (first {args.skip} skipped), {args.rounds} rounds")
    print(f"plain PyTorch loop     {plain:10.1f} tok/s")
    print(f"DeepSpeed trainer      {ds:10.1f} tok/s")
    print(f"ratio DeepSpeed/plain  {ds / plain:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
