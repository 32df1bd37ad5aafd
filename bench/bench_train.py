"""Training throughput: the DeepSpeed trainer (`python -m train`) vs a plain PyTorch loop, side by side.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken .venv/bin/python bench/bench_train.py --dataset DS \
        [--preset tiny] [--padded-vocab-size N] [--micro-batch 4] [--seq-len 64] [--grad-accum 2] [--steps 20] \
        [--precision bf16|fp32] [--compile] [--activation-checkpointing]

Both sides train the same model shape from the same seed on the same windows of DS with the same optimizer
(AdamW, decay on 2-D parameters, clipping 1.0, lr set per step) and the same batch, on the first GPU when there is
one, else on the CPU. The plain loop uses bf16 autocast when --precision bf16 (fp32 master weights); the trainer
runs the tiny recipe's DeepSpeed file (ZeRO-0; --deepspeed FILE another) with the recipe's precision (bf16 module weights with fp32 master weights and fp32 gradient
accumulation, or fp32). --compile and --activation-checkpointing set the recipe keys of the same names for the
trainer and do the same to the plain loop's model (nn.Module.compile in place; GPT.activation_checkpointing), so the
ratio stays like for like. tokens/s is the median over the steps after --skip warm-up steps (compilation happens in
the first). The trainer's is its wall-clock period per update: the spacing of consecutive metrics.jsonl lines (one
per update, log.every 1), so everything it does per update counts (the loader, the loss's all_reduce, DeepSpeed's
step, metrics lines, the progress bar), DeepSpeed start-up and checkpoint writing do not; its MFU is read from the
same file. A third row, the engine loop, drives the trainer's own DeepSpeed engine (its DeepSpeed config and
optimizer) with the plain loop's few lines: plain -> engine is what DeepSpeed costs, engine -> trainer what the
trainer's own work around the engine costs. Every side runs with glibc's malloc told to keep freed blocks under
32 MiB (MALLOC_KEPT, through GLIBC_TUNABLES; the trainer also sets it itself on a CPU, with mallopt; --malloc
default leaves glibc's defaults to the plain and engine sides): otherwise each update's tens of MiB go back to the
kernel and are page-faulted in again, a cost that changes from process to process with malloc's history and that
a GPU's caching allocator does not have. --before DIR runs the trainer of another checkout (e.g. `git worktree add
DIR COMMIT`) the same way, as another row. They alternate --rounds times to even out a shared machine.
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
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.device import MMAP_THRESHOLD_MAX, TRIM_THRESHOLD  # noqa: E402
from model.config import GPTConfig  # noqa: E402
from model.gpt import GPT  # noqa: E402
from prep.reader import Dataset  # noqa: E402
from train import launch  # noqa: E402
from train.data import TrainLoader  # noqa: E402
from train.metrics import mfu, peak_flops  # noqa: E402
from train.optim import build, set_lr  # noqa: E402
from train.recipe import Mfu, Optim, load  # noqa: E402

DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"  # the trainer alone on one GPU picks cuda:0 too
# glibc's tunables for every side's process: the thresholds the trainer sets itself on a CPU (common.device)
MALLOC_KEPT = f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD_MAX}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"


def side_env(args) -> dict:
    """The environment of a side's process: the caller's, with --malloc's allocator setting."""
    env = dict(os.environ)
    if args.malloc == "kept":
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), MALLOC_KEPT]))
    return env


def model_config(args) -> GPTConfig:
    return GPTConfig.preset(args.preset, padded_vocab_size=args.padded_vocab_size)


def plain_loop(args) -> list[dict]:
    torch.manual_seed(args.seed)
    model = GPT(model_config(args)).to(DEVICE)
    model.activation_checkpointing = args.activation_checkpointing
    if args.compile:
        model.compile()
    built = build(model, Optim(max_lr=3e-4, weight_decay=0.1), DEVICE, offload=False)
    optimizer = built.optimizer
    loader = TrainLoader(Dataset(args.dataset), args.micro_batch, args.seq_len, 0, 1, args.seed)
    autocast = (torch.autocast(DEVICE.split(":")[0], dtype=torch.bfloat16) if args.precision == "bf16"
                else nullcontext())
    peak = peak_flops(Mfu(), DEVICE)
    records = []
    for _ in range(args.steps):
        start = time.perf_counter()
        set_lr(optimizer, built.peak_lrs, 1.0)
        for _ in range(args.grad_accum):
            x, y = loader.next()
            with autocast:
                _, loss = model(x.to(DEVICE), y.to(DEVICE))
            (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
        rate = args.micro_batch * args.seq_len * args.grad_accum / (time.perf_counter() - start)
        records.append({"tokens_per_s": rate, "mfu": mfu(rate, model_config(args), args.seq_len, 1, peak)})
    return records


def recipe_sets(args, run_dir: str, deepspeed: str) -> list[str]:
    """The --set overrides of the tiny recipe that give the trainer this bench's run."""
    model = f"{{preset: {args.preset}, padded_vocab_size: {args.padded_vocab_size or 'null'}}}"
    return [f"run_dir={run_dir}", f"data.dir={args.dataset}", f"model={model}",
            f"precision={args.precision}", f"batch.micro_batch={args.micro_batch}",
            f"batch.seq_len={args.seq_len}", f"batch.total_tokens={args.micro_batch * args.seq_len * args.grad_accum}",
            f"schedule.max_steps={args.steps}", "eval.every=0", "sample.every=0", "checkpoint.every=0",
            "log.tensorboard=false", f"seed={args.seed}", f"deepspeed={deepspeed}",
            f"compile={str(args.compile).lower()}",
            f"activation_checkpointing={str(args.activation_checkpointing).lower()}"]


def engine_loop(args) -> list[dict]:
    """The trainer's DeepSpeed engine (its DeepSpeed config and optimizer, from the same recipe) driven by the plain
    loop's few lines: what DeepSpeed itself costs per update, apart from the trainer's own work around it."""
    import deepspeed as ds
    from train.recipe import batch_plan, deepspeed_config
    recipe = load(ROOT / "configs/train/tiny-cpu.yaml", recipe_sets(args, "unused", args.deepspeed))
    config = deepspeed_config(recipe, batch_plan(recipe, 1))
    launch.init_distributed(launch.setup(), timedelta(minutes=recipe.dist_timeout_minutes))
    torch.manual_seed(args.seed)
    model = GPT(model_config(args))
    model.activation_checkpointing = args.activation_checkpointing
    built = build(model, recipe.optim, DEVICE, offload=False)
    engine, *_ = ds.initialize(model=model, optimizer=built.optimizer, config=config)
    if args.compile:
        engine.compile()
    loader = TrainLoader(Dataset(args.dataset), args.micro_batch, args.seq_len, 0, 1, args.seed)
    peak = peak_flops(Mfu(), DEVICE)
    records = []
    for _ in range(args.steps):
        start = time.perf_counter()
        set_lr(built.optimizer, built.peak_lrs, 1.0)
        for _ in range(args.grad_accum):
            x, y = loader.next()
            _, loss = engine(x.to(engine.device), y.to(engine.device))
            engine.backward(loss)
            engine.step()
        loss.item()  # the trainer's one sync per update, so the host waits for the device alike
        rate = args.micro_batch * args.seq_len * args.grad_accum / (time.perf_counter() - start)
        records.append({"tokens_per_s": rate, "mfu": mfu(rate, model_config(args), args.seq_len, 1, peak)})
    return records


def deepspeed_trainer(args, repo: Path = ROOT, deepspeed: str | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        sets = recipe_sets(args, f"{tmp}/run", deepspeed or args.deepspeed)
        cmd = [sys.executable, "-m", "train", "--config", "configs/train/tiny-cpu.yaml", "--set", "log.every=1"]
        for s in sets:
            cmd += ["--set", s]
        # Without rendezvous variables from the caller (a shell under srun or torchrun): the trainer is rank 0 of 1.
        env = {k: v for k, v in side_env(args).items() if k not in launch.resolve_env({})}
        result = subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            sys.exit(f"python -m train exited {result.returncode}:\n{result.stderr[-3000:]}")
        lines = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        lines = [r for r in lines if "loss" in r]
        tokens = args.micro_batch * args.seq_len * args.grad_accum
        # The first line has no predecessor: its period is unknown, and it is a warm-up step anyway.
        return [{**r, "tokens_per_s": tokens / (r["time"] - prev["time"])} for prev, r in zip(lines, lines[1:])]


def fresh_process(side: str):
    """Run one side in a process of its own, as the trainer runs: no side inherits another's heap or threads."""
    def run(args) -> list[dict]:
        result = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], cwd=ROOT,
                                env=side_env(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            sys.exit(f"the {side} side exited {result.returncode}:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="a finished prep dataset dir")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--padded-vocab-size", type=int, default=None, help="e.g. 50304, as the GPU recipes")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the median")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--compile", action="store_true", help="torch.compile both sides (recipe key compile)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute blocks in backward on both sides (recipe key activation_checkpointing)")
    p.add_argument("--before", metavar="DIR", help="also run the trainer of this checkout (a third row)")
    p.add_argument("--deepspeed", metavar="FILE",
                   help="the trainer's and the engine loop's DeepSpeed config (default: the tiny recipe's)")
    p.add_argument("--also-deepspeed", metavar="FILE", help="also run this checkout's trainer with this DeepSpeed "
                   "config instead of --deepspeed's (another row)")
    p.add_argument("--malloc", choices=("kept", "default"), default="kept",
                   help="kept: every side's glibc keeps freed blocks for reuse (MALLOC_KEPT); default: glibc's own")
    p.add_argument("--side", choices=("plain", "engine"), help=argparse.SUPPRESS)  # one side, in this process
    args = p.parse_args()
    if args.steps <= args.skip:
        p.error(f"--steps {args.steps} leaves nothing after --skip {args.skip}")
    args.deepspeed = args.deepspeed or load(ROOT / "configs/train/tiny-cpu.yaml").deepspeed
    if args.side:
        print(json.dumps({"plain": plain_loop, "engine": engine_loop}[args.side](args)))
        return 0
    sides = [("plain", fresh_process("plain")), ("engine", fresh_process("engine")), ("deepspeed", deepspeed_trainer)]
    if args.also_deepspeed:
        sides.append(("also", lambda a: deepspeed_trainer(a, deepspeed=args.also_deepspeed)))
    if args.before:
        sides.append(("before", lambda a: deepspeed_trainer(a, Path(args.before).resolve())))
    results = {name: [] for name, _ in sides}
    mfus = {name: [] for name, _ in sides}
    for _ in range(args.rounds):
        for name, fn in sides:
            records = fn(args)[args.skip:]
            results[name].append(statistics.median(r["tokens_per_s"] for r in records))
            if records[0]["mfu"] is not None:
                mfus[name].append(statistics.median(r["mfu"] for r in records))
            print(f"{name:9s} median {results[name][-1]:10.1f} tok/s over {len(records)} steps"
                  + (f", MFU {mfus[name][-1]:.3f}" if mfus[name] else ""), flush=True)
    plain, ds = statistics.median(results["plain"]), statistics.median(results["deepspeed"])
    # Each round's sides ran back to back: the median of the rounds' own ratios follows a drifting machine best.
    paired = {name: statistics.median(r / p for r, p in zip(results[name], results["plain"])) for name in results}
    where = torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else f"{os.cpu_count()} CPUs"
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {where}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"preset {args.preset} (embedding rows {model_config(args).embedding_rows}), micro_batch {args.micro_batch} "
          f"x seq_len {args.seq_len} x grad_accum {args.grad_accum}, {args.precision}, compile {args.compile}, "
          f"activation checkpointing {args.activation_checkpointing}, {args.steps} steps (first {args.skip} skipped), "
          f"{args.rounds} rounds, DeepSpeed {args.deepspeed}, malloc {args.malloc}")
    print(f"plain PyTorch loop     {plain:10.1f} tok/s")
    print(f"DeepSpeed trainer      {ds:10.1f} tok/s")
    print(f"ratio DeepSpeed/plain  {ds / plain:10.3f}  (median of the rounds' ratios: {paired['deepspeed']:.3f})")
    engine = statistics.median(results["engine"])
    print(f"DeepSpeed engine alone {engine:10.1f} tok/s, ratio to plain {paired['engine']:.3f} (DeepSpeed's own cost)")
    trainer_engine = statistics.median(r / e for r, e in zip(results["deepspeed"], results["engine"]))
    print(f"ratio trainer/engine   {trainer_engine:10.3f}  (the trainer's own cost around the engine)")
    if args.before:
        before = statistics.median(results["before"])
        print(f"trainer of {args.before}: {before:10.1f} tok/s, ratio to plain {paired['before']:10.3f}")
    if args.also_deepspeed:
        also = statistics.median(results["also"])
        print(f"trainer with {args.also_deepspeed}: {also:10.1f} tok/s, ratio to plain {paired['also']:10.3f}")
    for name, label in (("plain", "plain PyTorch loop"), ("deepspeed", "DeepSpeed trainer")):
        if mfus[name]:
            print(f"MFU {label:18s} {statistics.median(mfus[name]):10.3f}  (docs/train.md, MFU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
