"""Optimizer and schedule side by side: adamw+cosine, muon+cosine, muon+wsd on the same model, data, seed and tokens.

    python bench/bench_recipe.py --text ../shared/data/gcide.txt --tokens 1.5e5

One invocation: the text is split into documents at blank lines (slurm/demo_data.py --text) and tokenized by
`python -m prep tokenize` (its own validation holdout), once, into WORK/data; then `python -m train` -- the real
trainer, the recipe configs/train/tiny-cpu.yaml with --set overrides -- trains the same 4 x 256 model at T=256
three times, each into WORK/runs/NAME (WORK: runs/bench_recipe), and this script reads their metrics.jsonl. It
prints a table (final validation loss, and the tokens each needs to reach adamw+cosine's final validation loss,
interpolated linearly between evaluations) and writes the curves (validation loss against tokens) to --png
(docs/img/bench_recipe.png) and everything to WORK/results.json.
Runs that already finished are read, not repeated (the trainer prints `run already complete`).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import files  # noqa: E402

# The same model, batch and cadence for every run; only the optimizer and the schedule differ.
COMMON = ["model.preset=null", "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=256",
          "model.vocab_size=50257", "batch.seq_len=256", "batch.micro_batch=8", "batch.total_tokens=2048",
          "deepspeed=configs/deepspeed/zero1.json", "precision=fp32", "optim.warmup_steps=10",
          "optim.min_lr_ratio=0.0", "checkpoint.keep_last=1", "sample.every=0", "log.tensorboard=false",
          "eval.val_batches=4"]
TOKENS_PER_STEP = 2048  # one rank, no accumulation: 8 sequences of 256 per update
# optim.grad_clip=0 for the Muon runs: at ZeRO 1 in fp32 DeepSpeed would clip Muon's update (train/recipe.py
# check_muon); the AdamW run keeps the recipe's clip of 1.0, as users run it.
RUNS = {
    "adamw+cosine": ["optim.name=adamw", "optim.max_lr=3e-3", "schedule.kind=cosine"],
    "muon+cosine": ["optim.name=muon", "optim.max_lr=3e-3", "optim.grad_clip=0", "schedule.kind=cosine"],
    "muon+wsd": ["optim.name=muon", "optim.max_lr=3e-3", "optim.grad_clip=0", "schedule.kind=wsd",
                 "schedule.decay_fraction=0.2", "schedule.decay_shape=1-sqrt"],
}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as out:
        status = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if status:
        sys.exit(f"error: {' '.join(cmd[:4])} ... exited {status}; see {log}")


def prepare(text: Path, work: Path) -> Path:
    data = work / "data"
    if (data / "manifest.json").exists():
        return data
    # gcide.txt holds a few cp1252 bytes (a 0x92 apostrophe at byte 3,641,181) that are not UTF-8, which
    # demo_data.py refuses: a UTF-8 copy with those replaced (U+FFFD) is what gets split.
    raw = text.read_bytes()
    decoded = raw.decode("utf-8", errors="replace")
    utf8 = work / "text.txt"
    files.write_text(utf8, decoded)
    print(f"{text}: {len(raw):,} bytes, {decoded.count(chr(0xFFFD))} not UTF-8 (replaced)", flush=True)
    docs = work / "docs"
    run([sys.executable, "slurm/demo_data.py", str(docs), "--text", str(utf8), "--files", "2"], work / "prep.log")
    run([sys.executable, "-m", "prep", "tokenize", "--input", str(docs), "--out", str(data),
         "--val-tokens", "500000"], work / "prep.log")
    return data


def train(name: str, sets: list[str], data: Path, work: Path, steps: int, eval_every: int, seed: int) -> Path:
    run_dir = work / "runs" / name.replace("+", "_")
    cmd = [sys.executable, "-m", "train", "--config", "configs/train/tiny-cpu.yaml"]
    for s in COMMON + sets + [f"run_dir={run_dir}", f"data.dir={data}", f"schedule.max_steps={steps}",
                              f"eval.every={eval_every}", f"checkpoint.every={steps}", f"seed={seed}"]:
        cmd += ["--set", s]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    run(cmd, work / f"{run_dir.name}.log")
    print(f"{name}: {time.time() - started:.0f} s", flush=True)
    return run_dir


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(tokens, val_loss) per evaluation, the last line per step (a resumed run logs steps again)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = {r["step"]: r["tokens"] for r in lines if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in lines if "val_loss" in r}
    return [(tokens[s], v) for s, v in sorted(val.items())]


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first token count at which the curve is at or below target, linear between evaluations."""
    prev = None
    for tokens, loss in curve:
        if loss <= target:
            if prev is None:
                return float(tokens)
            (t0, l0) = prev
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        prev = (tokens, loss)
    return None


def plot(curves: dict, target: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([t / 1e6 for t, _ in curve], [v for _, v in curve], marker=".", label=name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label="adamw+cosine final")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(8.0, max(v for c in curves.values() for _, v in c)))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with files.atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=REPO.parent / "shared" / "data" / "gcide.txt")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench_recipe", help="data, runs, logs, results.json")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "img" / "bench_recipe.png", help="the curves")
    p.add_argument("--tokens", type=float, default=1.5e5, help="training tokens per run (rounded up to whole steps)")
    p.add_argument("--evals", type=int, default=10, help="validation points per run")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.text, args.work)
    steps = -(-int(args.tokens) // TOKENS_PER_STEP)
    eval_every = max(1, steps // args.evals)
    curves = {name: val_curve(train(name, sets, data, args.work, steps, eval_every, args.seed))
              for name, sets in RUNS.items()}
    target = curves["adamw+cosine"][-1][1]
    rows = []
    for name, curve in curves.items():
        reach = tokens_to_reach(curve, target)
        rows.append({"run": name, "final_val_loss": round(curve[-1][1], 4), "tokens": curve[-1][0],
                     "tokens_to_adamw_final": None if reach is None else round(reach),
                     "fraction_of_adamw": None if reach is None else round(reach / curves["adamw+cosine"][-1][0], 3)})
    print(f"\n{'run':<14} {'final val loss':>14} {'tokens to adamw+cosine final':>29} {'x adamw':>8}")
    for r in rows:
        reach = "not reached" if r["tokens_to_adamw_final"] is None else f"{r['tokens_to_adamw_final']:,}"
        frac = "" if r["fraction_of_adamw"] is None else f"{r['fraction_of_adamw']:.3f}"
        print(f"{r['run']:<14} {r['final_val_loss']:>14.4f} {reach:>29} {frac:>8}")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, target, args.png)
    files.write_json(args.work / "results.json", {
        "rows": rows, "curves": curves, "steps": steps, "tokens_per_step": TOKENS_PER_STEP, "eval_every": eval_every,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv)})
    print(f"\ncurves: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
