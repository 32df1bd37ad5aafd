"""`python -m eval {checkpoint,export,watch,report}`: score checkpoints with lm-eval-harness, offline."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import cli
from common.cli import positive_int
from common.device import reuse_freed_cpu_memory, torch_device
from common.errors import UsageError


def add_scoring_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="hellaswag",
                   help="comma-separated lm-eval task names; 'hellaswag' is the offline local definition")
    p.add_argument("--hellaswag-file", type=cli.existing_path, default=None,
                   help="HellaSwag validation jsonl from `prep eval-data` (default data/eval/hellaswag_val.jsonl)")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N docs of each task")
    # Rows of at most block_size tokens per forward pass: beyond a few thousand no device has the memory.
    p.add_argument("--batch-size", type=cli.at_most(4096, "rows per forward pass"), default=32)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="the transformer's arithmetic: bf16 autocast or fp32; the LM head and log-softmax run in "
                        "fp32 either way (default auto: bf16 on CUDA, fp32 elsewhere; bf16 on a CPU reproduces a "
                        "GPU's scores)")


def scoring_flags(args) -> list[str]:
    """The scoring flags again, as `watch` passes them on to each `eval checkpoint` it starts."""
    out = ["--tasks", args.tasks, "--batch-size", str(args.batch_size)]
    if args.hellaswag_file:
        out += ["--hellaswag-file", str(args.hellaswag_file.resolve())]
    if args.limit:
        out += ["--limit", str(args.limit)]
    if args.device:
        out += ["--device", args.device]
    if args.dtype != "auto":
        out += ["--dtype", args.dtype]
    return out


def print_table(title: str, rows: dict) -> None:
    print(title)
    print(cli.table(rows, indent="  "))


def cmd_checkpoint(args) -> int:
    from train.rundir import run_dir_of

    from .harness import EvalError
    from .results import check_result_out, publish
    from .score import Scorer, default_output, write_result
    if args.out and len(args.ckpt) > 1:
        raise EvalError(f"--out names one result file but {len(args.ckpt)} checkpoints were given; without --out "
                        "each result goes to RUN/eval/<tag>.json")
    if len(args.ckpt) == 1 and not args.ckpt[0].exists():
        raise UsageError(f"argument CKPT: {args.ckpt[0]}: no such file or directory")
    if args.out:
        check_result_out(args.out)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    device = torch_device(args.device)
    if device == "cpu":
        reuse_freed_cpu_memory()  # as the trainer does: each batch's logits are freed and allocated again
    print_table("eval checkpoint", {"checkpoints": ", ".join(map(str, args.ckpt)), "tasks": ", ".join(tasks),
                                    "hellaswag file": args.hellaswag_file or "data/eval/hellaswag_val.jsonl",
                                    "limit": args.limit or "all docs", "batch size": args.batch_size,
                                    "device": device,
                                    "dtype": args.dtype,
                                    "output": args.out or ", ".join(str(default_output(c, "<tag>")) for c in args.ckpt)})
    scorer = Scorer(tasks, args.hellaswag_file, args.limit, args.batch_size, device, args.dtype)
    failed = 0
    for ckpt in args.ckpt:
        try:
            record = scorer.score(ckpt)
        except EvalError as exc:
            if len(args.ckpt) == 1:
                raise
            # One bad checkpoint does not cost the others their turn; the exit status still says it failed.
            print(f"error: {exc}", file=sys.stderr, flush=True)
            failed += 1
            continue
        out = args.out or default_output(ckpt, record["tag"])
        write_result(Path(out), record)
        run = run_dir_of(ckpt)
        if run is not None:
            publish(run.path, record)
        for name, m in record["tasks"].items():
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and k != "task_version")
            print(f"{name} (v{m['task_version']}, {m['n_docs']} docs): {metrics}")
        t = record["timings"]
        print(f"wrote {out} (tasks {t['tasks_s']:.1f} s, model {t['model_s']:.1f} s, score {t['score_s']:.1f} s)",
              flush=True)
    return 1 if failed else 0


def cmd_export(args) -> int:
    from .score import export_checkpoint
    meta = export_checkpoint(args.ckpt, args.out, force=args.force)
    print(f"wrote {args.out} (from {meta.get('kind')} checkpoint {meta.get('tag')}, step {meta.get('step')})")
    return 0


def cmd_watch(args) -> int:
    from .harness import DEFAULT_HELLASWAG, check_hellaswag_file
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.submit is not None:  # the scoring flags are the eval job's business (slurm/stage.sbatch eval)
        from .dispatch import Dispatcher
        watcher = Dispatcher(args.run_dir, args.submit, max_attempts=args.max_attempts, log=log, only=args.only)
        how = {"eval jobs": f"{args.submit} TAG"}
    else:
        torch_device(args.device)  # each scoring child would otherwise fail on it, max-attempts times
        from .watch import Watcher
        if "hellaswag" in args.tasks.split(","):  # a bad file would otherwise fail every checkpoint max-attempts times
            check_hellaswag_file(args.hellaswag_file or DEFAULT_HELLASWAG)
        watcher = Watcher(args.run_dir, scoring_flags(args), max_attempts=args.max_attempts, log=log, only=args.only)
        how = {"eval flags": " ".join(scoring_flags(args))}
    print_table("eval watch", {"run": watcher.run, "poll (s)": args.poll, "until final": args.until_final,
                               "final checkpoint": watcher.final_tag() or "unknown (no schedule in config.yaml)",
                               "only": ", ".join(args.only) if args.only else "every complete checkpoint",
                               "per-checkpoint command": watcher.command or "none",
                               "max attempts": args.max_attempts, **how})
    return watcher.watch(args.poll, args.until_final, once=args.once)


def cmd_report(args) -> int:
    from .report import write_report
    report, curves = write_report(args.run_dir)
    print(f"wrote {report} and {curves}")
    return 0


def register_checkpoint(sub) -> None:
    p = cli.add_command(sub, "checkpoint", cmd_checkpoint,
                        help="score checkpoints (DeepSpeed tag/run dir or HF dir), in one process")
    # Not existing_path: of several, one gone (rotated away by the run since the watcher listed it) is that
    # checkpoint's error, and the others are still scored; one alone is still a usage error.
    p.add_argument("ckpt", nargs="+", metavar="CKPT", type=Path,
                   help="run dir, RUN/checkpoints, RUN/checkpoints/global_stepN, or an HF directory; several are "
                        "scored one after another with the tasks loaded once")
    add_scoring_flags(p)
    p.add_argument("--out", type=Path, default=None,
                   help="result JSON, for one CKPT (default RUN/eval/<tag>.json)")


def register_export(sub) -> None:
    p = cli.add_command(sub, "export", cmd_export, help="write a checkpoint as a Hugging Face GPT2LMHeadModel directory")
    p.add_argument("ckpt", type=cli.existing_path)
    p.add_argument("--out", type=Path, required=True,
                   help="a new directory; an existing one must be empty or an earlier export (see --force)")
    p.add_argument("--force", action="store_true", help="replace an earlier export at --out (never anything else)")


def register_watch(sub) -> None:
    p = cli.add_command(sub, "watch", cmd_watch, help="score every complete checkpoint of a run, once each")
    p.add_argument("run_dir", metavar="RUN", type=cli.existing_path, help="run directory")
    p.add_argument("--poll", type=cli.poll_seconds, default=60.0, help="seconds between looks at RUN/checkpoints")
    until = p.add_mutually_exclusive_group()
    until.add_argument("--until-final", action="store_true",
                       help="exit once the run's last checkpoint (schedule in RUN/config.yaml) is scored")
    until.add_argument("--only", action="append", metavar="TAG",
                       help="this checkpoint (global_stepN) and no other; repeatable. Waits for it to be written "
                            "and for a lock another watcher holds; exit 0 once each is scored (or rotated away), 1 "
                            "if one is given up (or, with --once, not written yet); a step after the run's last is "
                            "refused (exit 2)")
    p.add_argument("--once", action="store_true", help="score what is complete now, then exit")
    p.add_argument("--max-attempts", type=positive_int, default=3,
                   help="tries per checkpoint before giving up (with --submit: eval jobs per checkpoint)")
    p.add_argument("--submit", metavar="COMMAND", default=None,
                   help="score nothing here: run COMMAND TAG (split like a shell line) once per complete checkpoint "
                        "to submit its own eval job, which must print the Slurm job id (sbatch --parsable); "
                        "the eval_watch stage's EVAL_MODE=jobs")
    add_scoring_flags(p)


def register_report(sub) -> None:
    p = cli.add_command(sub, "report", cmd_report, help="RUN/eval/report.md and RUN/eval/curves.png")
    p.add_argument("run_dir", metavar="RUN", type=cli.existing_path, help="run directory")


def main(argv=None) -> int:
    return cli.main_with_commands("python -m eval", __doc__,
                                  (register_checkpoint, register_export, register_watch, register_report), argv)


if __name__ == "__main__":
    sys.exit(main())
