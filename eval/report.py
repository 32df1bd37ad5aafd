"""`eval report RUN`: RUN/eval/report.md (a table per scored checkpoint) and RUN/eval/curves.png."""
from __future__ import annotations

from pathlib import Path

from common import files
from train.rundir import RunDir

from .harness import EvalError
from .results import current_segment, is_number, is_whole, read_records, run_records

# OpenAI GPT-2 124M, lm-eval 0-shot HellaSwag acc_norm (see docs/eval.md, Comparability).
GPT2_124M_ACC_NORM = 0.3114
# Half-width of a 95% normal interval, in standard errors: a score is read as different from the reference only
# when the reference lies outside score ± Z95 * stderr.
Z95 = 1.96


def unreadable_metric(m: dict) -> str | None:
    """A metrics line's field the report computes with that is not a number (a hand-edited line: a string there
    failed, with a traceback, where the steps are compared), or None."""
    bad = next((k for k, v in m.items() if (k == "step" and (v is None or not is_whole(v)))
                or (k == "tokens" and not is_whole(v))
                or ((k in ("loss", "val_loss") or k.startswith(PER_DATASET)) and not is_number(v))), None)
    return None if bad is None else f"{bad} {m[bad]!r} is not a number"


def read_metrics(run: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(training lines, validation lines) of RUN/metrics.jsonl by step, one line per step: the last one.

    After a kill, the updates between the last checkpoint and the kill are logged again by the resumed run; the
    later line belongs to the run that continued, so it replaces the earlier one.
    """
    lines = [m for m in read_records(RunDir(run).metrics, check=unreadable_metric) if "step" in m]
    train, val = {}, {}
    for m in current_segment(lines):  # not an earlier run's in this directory
        if "loss" in m and "skipped" not in m:  # a skipped update (train.heal) changed nothing
            train[m["step"]] = m
        if "val_loss" in m:
            val[m["step"]] = m
    return train, val


def _at_or_before(series: dict[int, float], step: int):
    steps = [s for s in series if s <= step]
    return series[max(steps)] if steps else None


def interval(acc: float | None, stderr: float | None) -> tuple[float, float] | None:
    if acc is None or stderr is None:
        return None
    return acc - Z95 * stderr, acc + Z95 * stderr


def versus_reference(acc: float | None, stderr: float | None) -> str | None:
    """'above' / 'below' GPT-2 124M when its acc_norm lies outside the 95% interval, else 'within'."""
    bounds = interval(acc, stderr)
    if bounds is None:
        return None
    low, high = bounds
    return "above" if low > GPT2_124M_ACC_NORM else "below" if high < GPT2_124M_ACC_NORM else "within"


# A mixture's validation lines hold val_loss (overall) and val_loss/NAME for each of its datasets.
PER_DATASET = "val_loss/"


def collect(run: Path, scored: list[dict] | None = None) -> tuple[list[dict], dict[str, list[tuple[int, float]]]]:
    """(table rows sorted by step, {metrics key: [(tokens, loss)]} for val_loss and each val_loss/NAME); val lines
    carry no tokens: taken from train lines. scored: the current run's results (run_records), when already read."""
    train_lines, val_lines = read_metrics(run)
    results = run_records(run)[0] if scored is None else scored
    train = {step: m["loss"] for step, m in train_lines.items()}
    tokens = {step: m["tokens"] for step, m in train_lines.items() if "tokens" in m}
    val = {step: m["val_loss"] for step, m in val_lines.items()}
    keys = sorted({k for m in val_lines.values() for k in m if k.startswith(PER_DATASET)})
    per_dataset = {k: {step: m[k] for step, m in val_lines.items() if k in m} for k in keys}
    rows = {}
    for r in results:
        step = r.get("step")
        hs = r.get("tasks", {}).get("hellaswag", {})
        rows[step] = {
            "step": step, "tokens": r.get("tokens_seen") or (_at_or_before(tokens, step) if step is not None else None),
            "train_loss": _at_or_before(train, step) if step is not None else None,
            "val_loss": _at_or_before(val, step) if step is not None else None,
            "val_by_dataset": {k.removeprefix(PER_DATASET): _at_or_before(series, step) if step is not None else None
                               for k, series in per_dataset.items()},
            "acc": hs.get("acc"), "acc_stderr": hs.get("acc_stderr"),
            "acc_norm": hs.get("acc_norm"), "acc_norm_stderr": hs.get("acc_norm_stderr"), "n_docs": hs.get("n_docs"),
        }
    curves = {key: [(_at_or_before(tokens, s) or 0, v) for s, v in sorted(series.items())]
              for key, series in {"val_loss": val, **per_dataset}.items()}
    curves["train_loss"] = [(tokens.get(s, 0), v) for s, v in sorted(train.items())]
    return sorted(rows.values(), key=lambda r: (r["step"] is None, r["step"] or 0)), curves


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def _with_interval(acc, stderr):
    if acc is None:
        return "–"
    return f"{acc:.4f}" if stderr is None else f"{acc:.4f} ± {Z95 * stderr:.4f}"


def markdown(run: Path, rows: list[dict]) -> str:
    names = sorted({name for r in rows for name in r.get("val_by_dataset", {})})
    mixture = (" For a mixture, val loss is the mean of its datasets' val losses weighted by the mixture's shares, "
               "and each dataset has its own column." if names else "")
    lines = [f"# Evaluation report: {run.name}", "",
             f"HellaSwag 0-shot (lm-eval-harness); GPT-2 124M reference acc_norm {GPT2_124M_ACC_NORM}. "
             f"± is {Z95} x lm-eval's standard error (a 95% interval): with few docs it is wide, and a score is "
             "above or below the reference only when the reference lies outside it. "
             f"Losses are the last logged at or before each checkpoint's step.{mixture}", "",
             "| step | tokens | train loss | val loss | " + "".join(f"val loss {n} | " for n in names)
             + "HellaSwag acc | acc_norm | docs | vs GPT-2 124M |",
             "|---:|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|---:|:---|"]
    for r in rows:
        by_dataset = r.get("val_by_dataset", {})
        lines.append(f"| {_fmt(r['step'], 'd')} | {_fmt(r['tokens'], ',d')} | {_fmt(r['train_loss'], '.4f')} | "
                     f"{_fmt(r['val_loss'], '.4f')} | "
                     + "".join(f"{_fmt(by_dataset.get(n), '.4f')} | " for n in names)
                     + f"{_with_interval(r['acc'], r['acc_stderr'])} | "
                     f"{_with_interval(r['acc_norm'], r['acc_norm_stderr'])} | {_fmt(r['n_docs'], 'd')} | "
                     f"{versus_reference(r['acc_norm'], r['acc_norm_stderr']) or '–'} |")
    return "\n".join(lines) + "\n"


def other_checkpoints(unscored: list[dict], earlier: list[dict]) -> str:
    """The report's sections on checkpoints of this run never scored, and scores of an earlier run here."""
    lines = []
    if unscored:
        lines += ["", "## Not scored", "", "| step | checkpoint | why |", "|---:|:---|:---|"]
        lines += [f"| {_fmt(r.get('step'), 'd')} | {r.get('tag')} | {r['unscored']} |"
                  for r in sorted(unscored, key=lambda r: r.get("step") or 0)]
    if earlier:
        lines += ["", "## Earlier runs in this directory",
                  "", "Checkpoints that are not of the current run (it restarted from scratch, or they were deleted "
                      "by hand): their scores, without the current run's losses.", "",
                  "| step | checkpoint | written | HellaSwag acc_norm | docs |", "|---:|:---|:---|---:|---:|"]
        for r in sorted(earlier, key=lambda r: (str(r.get("checkpoint_written")), r.get("step") or 0)):
            hs = r.get("tasks", {}).get("hellaswag", {})
            lines.append(f"| {_fmt(r.get('step'), 'd')} | {r.get('tag')} | {r.get('checkpoint_written') or '–'} | "
                         f"{_with_interval(hs.get('acc_norm'), hs.get('acc_norm_stderr'))} | "
                         f"{_fmt(hs.get('n_docs'), 'd')} |")
    return "\n".join(lines) + "\n" if lines else ""


def plot(path: Path, rows: list[dict], curves: dict[str, list[tuple[int, float]]], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.8))
    try:
        for i, (key, curve) in enumerate(curves.items()):
            if not curve:
                continue
            if key == "train_loss":
                ax_loss.plot(*zip(*curve), linewidth=1, color="tab:gray", alpha=0.8, label="train loss")
            elif key == "val_loss":
                ax_loss.plot(*zip(*curve), marker="o", ms=3, color="tab:blue",
                             label="val loss" + (" (mixture)" if any(k.startswith(PER_DATASET) for k in curves)
                                                 else ""))
            else:  # colours C1, C2, ...: C0 is tab:blue, the overall curve's
                ax_loss.plot(*zip(*curve), marker=".", ms=3, linestyle="--", linewidth=1, color=f"C{i}",
                             label=f"val loss {key.removeprefix(PER_DATASET)}")
        ax_loss.set(xlabel="tokens", ylabel="loss", title="Training and validation loss")
        ax_loss.grid(alpha=0.3)
        ax_loss.legend()
        scored = sorted((r for r in rows if r["tokens"] is not None and r["acc_norm"] is not None),
                        key=lambda r: r["tokens"])
        if scored:
            docs = sorted({r["n_docs"] for r in scored if r["n_docs"] is not None})
            x = [r["tokens"] for r in scored]
            y = [r["acc_norm"] for r in scored]
            ax_acc.plot(x, y, marker="o", ms=4, color="tab:orange",
                        label=f"acc_norm (this run, {'/'.join(map(str, docs))} docs)")
            banded = [(r["tokens"], *interval(r["acc_norm"], r["acc_norm_stderr"])) for r in scored
                      if r["acc_norm_stderr"] is not None]
            if banded:
                bx, low, high = zip(*banded)
                # Error bars show the interval even for a single checkpoint, where a band has no width.
                ax_acc.fill_between(bx, low, high, color="tab:orange", alpha=0.2, linewidth=0,
                                    label=f"95% interval (±{Z95}·stderr)")
                ax_acc.errorbar(bx, [(lo + hi) / 2 for lo, hi in zip(low, high)],
                                yerr=[(hi - lo) / 2 for lo, hi in zip(low, high)], fmt="none",
                                ecolor="tab:orange", alpha=0.6, capsize=3)
        ax_acc.axhline(GPT2_124M_ACC_NORM, color="gray", linestyle="--",
                       label=f"GPT-2 124M (OpenAI): {GPT2_124M_ACC_NORM}")
        ax_acc.axhline(0.25, color="lightgray", linestyle=":", label="chance: 0.25")
        ax_acc.set(xlabel="tokens", ylabel="HellaSwag acc_norm", title="HellaSwag 0-shot acc_norm")
        ax_acc.grid(alpha=0.3)
        # Below the axes: a wide interval band leaves no empty corner inside them.
        ax_acc.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small")
        fig.suptitle(title)
        fig.tight_layout()
        with files.atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)


def write_report(run: Path) -> tuple[Path, Path]:
    run = Path(run).resolve()
    layout = RunDir(run)
    if not layout.metrics.exists() and not layout.results.exists():
        raise EvalError(f"{run}: neither {layout.metrics.relative_to(run)} nor {layout.results.relative_to(run)}; "
                        f"not a run directory?")
    # Eval jobs finishing together, and a user's own `eval report`, each render: one at a time, reading under the
    # lock, so the last to render has read every line appended before it and no slower renderer replaces a newer
    # report with an older one. Always the watcher's directory and report.lock, also before any watcher ran: a
    # lock taken only where .watch/ exists would leave the first renders of a run unserialised.
    layout.watch.mkdir(parents=True, exist_ok=True)
    with files.lock(layout.watch / "report.lock", f"the report of {run}", wait=True):
        scored, unscored, earlier = run_records(run)
        rows, curves = collect(run, scored)
        files.write_text(layout.report, markdown(run, rows) + other_checkpoints(unscored, earlier))
        plot(layout.curves, rows, curves, run.name)
    return layout.report, layout.curves
