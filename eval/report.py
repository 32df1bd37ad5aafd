"""`eval report RUN`: RUN/eval/report.md (a table per scored checkpoint) and RUN/eval/curves.png."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .harness import EvalError

# OpenAI GPT-2 124M, lm-eval 0-shot HellaSwag acc_norm (DESIGN.md, reference figures).
GPT2_124M_ACC_NORM = 0.3114


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A line cut short by a crash is the only expected damage: report it, keep the rest.
            print(f"warning: {path}:{lineno}: not JSON, ignored")
    return rows


def _at_or_before(series: dict[int, float], step: int):
    steps = [s for s in series if s <= step]
    return series[max(steps)] if steps else None


def collect(run: Path) -> tuple[list[dict], list[tuple[int, float]]]:
    """(table rows sorted by step, [(tokens, val_loss)]); val lines carry no tokens: taken from train lines."""
    metrics = read_jsonl(run / "metrics.jsonl")
    results = read_jsonl(run / "eval" / "results.jsonl")
    train = {m["step"]: m["loss"] for m in metrics if "loss" in m and "step" in m}
    tokens = {m["step"]: m["tokens"] for m in metrics if "tokens" in m and "step" in m}
    val = {m["step"]: m["val_loss"] for m in metrics if "val_loss" in m and "step" in m}
    rows = {}
    for r in results:
        step = r.get("step")
        hs = r.get("tasks", {}).get("hellaswag", {})
        rows[step] = {
            "step": step, "tokens": r.get("tokens_seen") or (_at_or_before(tokens, step) if step is not None else None),
            "train_loss": _at_or_before(train, step) if step is not None else None,
            "val_loss": _at_or_before(val, step) if step is not None else None,
            "acc": hs.get("acc"), "acc_norm": hs.get("acc_norm"), "n_docs": hs.get("n_docs"),
        }
    val_curve = [(_at_or_before(tokens, s) or 0, v) for s, v in sorted(val.items())]
    return sorted(rows.values(), key=lambda r: (r["step"] is None, r["step"] or 0)), val_curve


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def markdown(run: Path, rows: list[dict]) -> str:
    lines = [f"# Evaluation report: {run.name}", "",
             "HellaSwag 0-shot (lm-eval-harness); GPT-2 124M reference acc_norm 0.3114. "
             "Losses are the last logged at or before each checkpoint's step.", "",
             "| step | tokens | train loss | val loss | HellaSwag acc | acc_norm | docs |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {_fmt(r['step'], 'd')} | {_fmt(r['tokens'], ',d')} | {_fmt(r['train_loss'], '.4f')} | "
                     f"{_fmt(r['val_loss'], '.4f')} | {_fmt(r['acc'], '.4f')} | {_fmt(r['acc_norm'], '.4f')} | "
                     f"{_fmt(r['n_docs'], 'd')} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict], val_curve: list[tuple[int, float]], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    if val_curve:
        ax_loss.plot(*zip(*val_curve), marker="o", ms=3, color="tab:blue", label="val loss")
    ax_loss.set(xlabel="tokens", ylabel="validation loss", title="Validation loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    scored = [(r["tokens"], r["acc_norm"]) for r in rows if r["tokens"] is not None and r["acc_norm"] is not None]
    if scored:
        docs = sorted({r["n_docs"] for r in rows if r["acc_norm"] is not None})
        ax_acc.plot(*zip(*scored), marker="o", ms=4, color="tab:orange",
                    label=f"acc_norm (this run, {'/'.join(map(str, docs))} docs)")
    ax_acc.axhline(GPT2_124M_ACC_NORM, color="gray", linestyle="--", label="GPT-2 124M (OpenAI): 0.3114")
    ax_acc.axhline(0.25, color="lightgray", linestyle=":", label="chance: 0.25")
    ax_acc.set(xlabel="tokens", ylabel="HellaSwag acc_norm", title="HellaSwag 0-shot acc_norm")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def write_report(run: Path) -> tuple[Path, Path]:
    run = Path(run).resolve()
    if not (run / "metrics.jsonl").exists() and not (run / "eval" / "results.jsonl").exists():
        raise EvalError(f"{run}: neither metrics.jsonl nor eval/results.jsonl; not a run directory?")
    rows, val_curve = collect(run)
    out = run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    fd, tmp = tempfile.mkstemp(prefix=".report.md.", dir=out)
    with os.fdopen(fd, "w") as f:
        f.write(markdown(run, rows))
    os.replace(tmp, report)
    curves = out / "curves.png"
    plot(curves, rows, val_curve, run.name)
    return report, curves
