"""`python -m eval {checkpoint,export,watch,report}`: score checkpoints with lm-eval-harness, offline."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import cli
from common.cli import positive_int


def add_scoring_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="hellaswag",
                   help="comma-separated lm-eval task names; 'hellaswag' is the offline local definition")
    p.add_argument("--hellaswag-file", type=Path, default=None,
                   help="HellaSwag validation jsonl from `prep eval-data` (default data/eval/hellaswag_val.jsonl)")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N docs of each task")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def scoring_flags(args) -> list[str]:
    """The scoring flags again, as `watch` passes them on to each `eval checkpoint` it starts."""
    out = ["--tasks", args.tasks, "--batch-size", str(args.batch_size)]
    if args.hellaswag_file:
        out += ["--hellaswag-file", str(args.hellaswag_file.resolve())]
    if args.limit:
        out += ["--limit", str(args.limit)]
    if args.device:
        out += ["--device", args.device]
    return out


def print_table(title: str, rows: dict) -> None:
    width = max(map(len, rows))
    print(title)
    for key, value in rows.items():
        print(f"  {key:<{width}}  {value}")


def cmd_checkpoint(args) -> int:
    from .score import default_output, evaluate_checkpoint, write_json_atomic
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    print_table("eval checkpoint", {"checkpoint": args.ckpt, "tasks": ", ".join(tasks),
                                    "hellaswag file": args.hellaswag_file or "data/eval/hellaswag_val.jsonl",
                                    "limit": args.limit or "all docs", "batch size": args.batch_size,
                                    "device": args.device or "auto", "output": args.out or "RUN/eval/<tag>.json"})
    record = evaluate_checkpoint(args.ckpt, tasks, args.hellaswag_file, args.limit, args.batch_size, args.device)
    out = args.out or default_output(args.ckpt, record["tag"])
    write_json_atomic(Path(out), record)
    for name, m in record["tasks"].items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and k != "task_version")
        print(f"{name} (v{m['task_version']}, {m['n_docs']} docs): {metrics}")
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from .score import export_checkpoint
    meta = export_checkpoint(args.ckpt, args.out)
    print(f"wrote {args.out} (from {meta.get('kind')} checkpoint {meta.get('tag')}, step {meta.get('step')})")
    return 0


def cmd_watch(args) -> int:
    from .harness import DEFAULT_HELLASWAG, check_hellaswag_file
    from .watch import Watcher
    if "hellaswag" in args.tasks.split(","):  # a bad file would otherwise fail every checkpoint max-attempts times
        check_hellaswag_file(args.hellaswag_file or DEFAULT_HELLASWAG)
    watcher = Watcher(args.run_dir, scoring_flags(args), max_attempts=args.max_attempts,
                      log=lambda msg: print(msg, flush=True))
    print_table("eval watch", {"run": watcher.run, "poll (s)": args.poll, "until final": args.until_final,
                               "final checkpoint": watcher.final_tag() or "unknown (no schedule in config.yaml)",
                               "per-checkpoint command": watcher.command or "none",
                               "max attempts": args.max_attempts, "eval flags": " ".join(scoring_flags(args))})
    return watcher.watch(args.poll, args.until_final, once=args.once)


def cmd_report(args) -> int:
    from .report import write_report
    report, curves = write_report(args.run_dir)
    print(f"wrote {report} and {curves}")
    return 0


def main(argv=None) -> int:
    parser = cli.Parser(prog="python -m eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("checkpoint", help="score one checkpoint (DeepSpeed tag/run dir or HF dir)")
    p.add_argument("ckpt", help="run dir, RUN/checkpoints, RUN/checkpoints/global_stepN, or an HF directory")
    add_scoring_flags(p)
    p.add_argument("--out", type=Path, default=None, help="result JSON (default RUN/eval/<tag>.json)")
    p.set_defaults(run=cmd_checkpoint)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face GPT2LMHeadModel directory")
    p.add_argument("ckpt")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("watch", help="score every complete checkpoint of a run, once each")
    p.add_argument("run_dir", metavar="RUN", type=Path, help="run directory")
    p.add_argument("--poll", type=float, default=60.0, help="seconds between looks at RUN/checkpoints")
    p.add_argument("--until-final", action="store_true",
                   help="exit once the run's last checkpoint (schedule in RUN/config.yaml) is scored")
    p.add_argument("--once", action="store_true", help="score what is complete now, then exit")
    p.add_argument("--max-attempts", type=positive_int, default=3, help="tries per checkpoint before giving up")
    add_scoring_flags(p)
    p.set_defaults(run=cmd_watch)

    p = sub.add_parser("report", help="RUN/eval/report.md and RUN/eval/curves.png")
    p.add_argument("run_dir", metavar="RUN", type=Path, help="run directory")
    p.set_defaults(run=cmd_report)

    return cli.run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
