"""The loss path's memory: GPT's chunked cross-entropy against the unchunked one it replaced, side by side.

    .venv/bin/python bench/bench_loss.py [--rows 8192] [--n-embd 768] [--padded-vocab 50304] [--vocab 50257]
        [--dtype fp32|bf16] [--rounds 2]

One forward + backward of the loss alone: (rows, n_embd) features and the (padded vocab, n_embd) tied weight,
both requiring grad, random targets. "unchunked" is what GPT.forward did before: the head's matmul over every row,
the slice to the real vocabulary, .float(), F.cross_entropy; "chunked" is model.gpt.chunked_cross_entropy. Each
runs in a fresh process (alternating, --rounds times) and reports the rise of its peak RSS over what the inputs
and their gradients take (ru_maxrss, measured after allocating them), per token and in all, and its wall time.
On a GPU the same difference is what torch.cuda.max_memory_allocated would show; CPU RSS counts the same tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def one(args) -> dict:
    import torch
    import torch.nn.functional as F

    from model.gpt import chunked_cross_entropy
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    features = torch.randn(args.rows, args.n_embd, dtype=dtype, requires_grad=True)
    weight = (0.02 * torch.randn(args.padded_vocab, args.n_embd)).to(dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.rows,))
    # Gradients allocated up front, as a training step has them, so the rise below is the loss path's own.
    features.grad, weight.grad = torch.zeros_like(features), torch.zeros_like(weight)
    base = peak_rss()
    start = time.perf_counter()
    if args.variant == "unchunked":
        logits = F.linear(features, weight)[:, :args.vocab]
        loss = F.cross_entropy(logits.float(), targets)
    else:
        loss = chunked_cross_entropy(features, weight, targets, args.vocab)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"variant": args.variant, "loss": loss.item(), "peak_bytes": peak_rss() - base, "seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192, help="tokens in the micro batch (B x T)")
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--padded-vocab", type=int, default=50304)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variant", choices=("unchunked", "chunked"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(one(args)))
        return 0
    results = {"unchunked": [], "chunked": []}
    for _ in range(args.rounds):
        for variant in results:
            cmd = [sys.executable, __file__, "--variant", variant] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("variant", "rounds")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
            r = results[variant][-1]
            print(f"{variant:9s} loss {r['loss']:.6f}  peak +{r['peak_bytes'] / 2**20:8.1f} MiB  {r['seconds']:.2f} s",
                  flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; rows {args.rows} x n_embd {args.n_embd}, vocab {args.vocab} "
          f"(padded {args.padded_vocab}), {args.dtype}, {args.rounds} rounds (medians)")
    print("| loss path | peak over inputs (MiB) | bytes per token | seconds (fwd+bwd) |")
    print("| --- | ---: | ---: | ---: |")
    for variant, rows in results.items():
        peak = statistics.median(r["peak_bytes"] for r in rows)
        print(f"| {variant} | {peak / 2**20:,.0f} | {peak / args.rows:,.0f} | "
              f"{statistics.median(r['seconds'] for r in rows):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
