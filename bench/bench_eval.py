"""HellaSwag scoring speed: our evaluator vs lm-eval's `hf` backend on the same exported model, side by side.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
      .venv/bin/python bench/bench_eval.py --hellaswag-file ../shared/data/hellaswag_val.jsonl [--limit N]

Runs, in one process and in this order: ours at --batch-size, `hf` at --batch-size, `hf` at its default batch
size 1. Each run scores the same docs of the offline HellaSwag task; docs/s counts only eval.harness.run_tasks (lm-eval's
evaluate; model loading excluded). The model is --checkpoint (anything train.rundir.consolidate.load_model reads)
or, by default, a freshly initialised --preset: speed does not depend on the weights. All three must give the same accuracy.

--dtypes bf16,fp32 instead scores the same docs with ours in each dtype (eval checkpoint --dtype) and compares them
doc by doc: acc_norm decisions that differ, the largest log-likelihood difference; --json writes that record.
"""
from __future__ import annotations

import argparse
import json
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


def compare_dtypes(model, args) -> dict:
    """Ours at each of args.dtypes on the same docs; the first against the second, doc by doc."""
    import numpy as np

    from eval import harness
    from eval.lm import PipelineLM
    tasks = harness.load_tasks(["hellaswag"], args.hellaswag_file)
    first, second = args.dtypes.split(",")
    lls, acc_norm, seconds = {}, {}, {}
    for dtype in (first, second):
        lm = PipelineLM(model=model, batch_size=args.batch_size, device=args.device, dtype=dtype)
        start = time.perf_counter()
        out = harness.run_tasks(lm, tasks, limit=args.limit, log_samples=True)
        seconds[dtype] = round(time.perf_counter() - start, 2)
        samples = out["samples"]["hellaswag_local"]
        lls[dtype] = {s["doc_id"]: np.array([r[0][0] for r in s["resps"]]) for s in samples}
        acc_norm[dtype] = out["results"]["hellaswag_local"]["acc_norm,none"]
        choices = {s["doc_id"]: np.array([len(c) for c in s["doc"]["choices"]]) for s in samples}
    decide = {d: {doc: int(np.argmax(ll / choices[doc])) for doc, ll in lls[d].items()} for d in lls}
    return {"dtypes": [first, second], "docs": len(choices), "device": args.device,
            "decisions_differing": sum(decide[first][doc] != decide[second][doc] for doc in choices),
            "max_abs_loglik_diff": max(float(np.abs(lls[first][d] - lls[second][d]).max()) for d in choices),
            "acc_norm": {first: acc_norm[first], second: acc_norm[second]}, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hellaswag-file", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="first N docs (default: all 10,042)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default=None, metavar="A,B", help="compare ours in two dtypes (bf16,fp32) instead")
    p.add_argument("--json", type=Path, default=None, help="with --dtypes: write the comparison here")
    args = p.parse_args()
    if args.dtypes and len(args.dtypes.split(",")) != 2:
        p.error(f"--dtypes takes two of auto, bf16, fp32, comma-separated, got {args.dtypes!r}")

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
    if args.dtypes:
        from common import files
        record = compare_dtypes(model, args)
        print(json.dumps(record))
        if args.json:
            files.write_json(args.json, record, indent=2)
        return
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
