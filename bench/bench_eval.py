"""HellaSwag scoring speed: our evaluator vs lm-eval's `hf` backend on the same exported model, side by side.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
      .venv/bin/python bench/bench_eval.py --hellaswag-file ../shared/data/hellaswag_val.jsonl [--limit N]

Runs, in one process and in this order: ours at --batch-size, `hf` at --batch-size, `hf` at its default batch
size 1. Each run scores the same docs of the offline HellaSwag task; docs/s counts only eval.harness.run_tasks (lm-eval's
evaluate; model loading excluded). The model is --checkpoint (anything train.rundir.consolidate.load_model reads)
or, by default, a freshly initialised --preset: speed does not depend on the weights. All three must give the same accuracy.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def timed_run(lm, hellaswag_file, limit):
    from eval import harness
    tasks = harness.load_tasks(["hellaswag"], hellaswag_file)
    start = time.perf_counter()
    raw = harness.run_tasks(lm, tasks, limit=limit)
    seconds = time.perf_counter() - start
    summary = harness.summarize(raw, tasks)["hellaswag"]
    return summary, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hellaswag-file", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="first N docs (default: all 10,042)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from lm_eval.api.registry import get_model

    from eval.lm import PipelineLM
    from train.rundir.consolidate import load_model
    from model.config import GPTConfig
    from model.gpt import GPT
    if args.checkpoint:
        model, _ = load_model(args.checkpoint)
        label = args.checkpoint
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset(args.preset)).eval()
        label = f"preset {args.preset}, random init"
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        model.save_hf(hf_dir)
        runs = []
        for name, make in [
            (f"ours, batch {args.batch_size}",
             lambda: PipelineLM(model=model, batch_size=args.batch_size, device=args.device)),
            (f"lm-eval hf, batch {args.batch_size}", lambda: get_model("hf").create_from_arg_obj(
                {"pretrained": str(hf_dir), "dtype": "float32"}, {"batch_size": args.batch_size, "device": args.device})),
            ("lm-eval hf, batch 1 (its default)", lambda: get_model("hf").create_from_arg_obj(
                {"pretrained": str(hf_dir), "dtype": "float32"}, {"batch_size": 1, "device": args.device})),
        ]:
            summary, seconds = timed_run(make(), args.hellaswag_file, args.limit)
            runs.append((name, summary, seconds))
            print(f"{name}: {summary['n_docs']} docs in {seconds:.1f} s", flush=True)

    accs = {(s["acc"], s["acc_norm"]) for _, s, _ in runs}
    ours_rate = runs[0][1]["n_docs"] / runs[0][2]
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, model: {label} "
          f"({model.num_params():,} params), device {args.device}")
    print("| evaluator | docs | seconds | docs/s | ours is x faster | acc | acc_norm |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s, seconds in runs:
        rate = s["n_docs"] / seconds
        print(f"| {name} | {s['n_docs']} | {seconds:.1f} | {rate:.2f} | {ours_rate / rate:.2f} | "
              f"{s['acc']:.4f} | {s['acc_norm']:.4f} |")
    if len(accs) != 1:
        sys.exit(f"error: the evaluators disagree on accuracy: {accs}")


if __name__ == "__main__":
    main()
