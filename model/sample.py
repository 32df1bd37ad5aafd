"""`python -m model sample CKPT_OR_HF_DIR --prompt "..." --num 4 --seed 42`: text from a trained or imported GPT-2.

CKPT_OR_HF_DIR is anything train.rundir.consolidate.load_model accepts (an HF directory, a training run, its checkpoints
dir or one checkpoint tag); `--preset NAME` samples from a freshly initialised model instead (a smoke test).
The same seed gives the same samples on the same device.
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import cli, tokenizer
from common.cli import positive_float, positive_int
from common.device import torch_device
from common.errors import PipelineError, UsageError

from .config import PRESETS, GPTConfig
from .gpt import GPT


# Bounds that keep a typo (--num 100000) from allocating tens of GB or running for hours; generation beyond
# block_size slides its window, so MAX_NEW_TOKENS bounds time only.
MAX_SAMPLES = 10_000
MAX_NEW_TOKENS = 65_536
BATCH = 64


class SampleError(PipelineError):
    pass


def load(args) -> tuple[GPT, str]:
    """(model in eval mode, a one-line description of where it came from)."""
    if args.preset is not None:
        config = GPTConfig.preset(args.preset)
        torch.manual_seed(args.seed)  # the random init is part of what --seed fixes
        return GPT(config).eval(), f"preset {args.preset} (random init, seed {args.seed})"
    from train.rundir.consolidate import load_model
    model, meta = load_model(args.source)
    where = f"{meta['kind']} {meta['path']}"
    if meta["kind"] == "deepspeed":
        where += f" (step {meta['step']}, {meta['tokens_seen']} tokens seen, {meta['weights']})"
    return model, where


def prompt_tokens(prompt: str, config: GPTConfig) -> list[int]:
    # An empty prompt starts from <|endoftext|>, the token every training document begins with.
    tokens = tokenizer.encode(prompt) if prompt else [tokenizer.EOT_TOKEN]
    if len(tokens) > config.block_size:
        raise SampleError(f"prompt is {len(tokens)} tokens, longer than the model's block_size {config.block_size}")
    if max(tokens) >= config.vocab_size:
        raise SampleError(f"prompt token {max(tokens)} is outside the model's vocabulary (vocab_size "
                          f"{config.vocab_size}): sampling needs a model trained on the GPT-2 BPE")
    return tokens


def run(args) -> int:
    device = torch_device(args.device)
    try:  # before loading: a device that holds tensors but has no generator (meta) cannot sample
        generator = torch.Generator(device=device).manual_seed(args.seed)
    except RuntimeError as exc:
        raise UsageError(f"--device {device} cannot sample: {str(exc).splitlines()[0]}") from None
    model, where = load(args)
    config = model.config
    if config.vocab_size > tokenizer.N_VOCAB:
        raise SampleError(f"vocab_size {config.vocab_size} exceeds the GPT-2 BPE's {tokenizer.N_VOCAB} tokens: "
                          "its samples could not be decoded")
    tokens = prompt_tokens(args.prompt, config)
    model.to(device)
    print(f"model: {where}\nconfig: {config.to_dict()}\nparameters: {model.num_params():,}  device: {device}  "
          f"seed: {args.seed}  top_k: {args.top_k}  temperature: {args.temperature}", file=sys.stderr)
    # At most BATCH rows per forward: memory stays that of BATCH samples whatever --num is, and each batch is
    # printed as it is done.
    for first in range(0, args.num, BATCH):
        rows = min(BATCH, args.num - first)
        idx = torch.tensor([tokens] * rows, dtype=torch.long, device=device)
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             generator=generator)
        for i, row in enumerate(out.tolist(), start=first):
            print(f"--- sample {i} ---")
            print(tokenizer.decode(row), flush=True)
    return 0


def seed(text: str) -> int:
    """argparse type: an integer torch.manual_seed takes (it refuses more than 64 bits with a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None
    if not -2**63 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be from -2^63 to 2^64 - 1, got {text[:40]}")
    return value


def register(subparsers) -> None:
    p = cli.add_command(subparsers, "sample", run, help="generate text from a checkpoint, an HF directory or a preset",
                        description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("source", nargs="?", metavar="CKPT_OR_HF_DIR", type=cli.existing_path,
                        help="HF directory, run dir, checkpoints dir or checkpoint tag dir")
    source.add_argument("--preset", choices=PRESETS, help="sample from a randomly initialised model of this shape")
    p.add_argument("--prompt", default="", help="text to continue (default: start from <|endoftext|>)")
    p.add_argument("--num", type=cli.at_most(MAX_SAMPLES, "samples per command"), default=4,
                   help=f"number of samples (at most {MAX_SAMPLES:,}; generated {BATCH} at a time)")
    p.add_argument("--max-new-tokens", type=cli.at_most(MAX_NEW_TOKENS, "tokens per sample"), default=64)
    p.add_argument("--top-k", type=positive_int, default=50, help="sample among the k likeliest tokens; 1 is greedy")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--seed", type=seed, default=42)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
