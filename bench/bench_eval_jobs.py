"""Per-checkpoint eval jobs on the real Slurm test cluster: how much of each job is start-up, how much scoring.

Starts the test cluster of tests/slurm_cluster.py (two slurmd nodes in network namespaces on this machine: needs
root, installs slurm-wlm and munge on first use), submits the tiny pipeline with slurm/submit.sh as a user would
(EVAL_MODE=jobs, the default: the watcher submits one eval job per complete checkpoint), waits for every job,
then prints one row per eval job: the job's elapsed time as the controller recorded it (jobcomp StartTime to
EndTime, whole seconds), and from the job's result JSON the seconds spent loading tasks, loading the model and
scoring (lm-eval's evaluate over the docs). Start-up is elapsed less scoring: the shell script, the Python
process start and imports, the task and model loading and the report the job re-renders after its result.

    python bench/bench_eval_jobs.py --checkpoints 4 --limit 20
    python bench/bench_eval_jobs.py --vs /tmp/before --rounds 2   # and an earlier commit's checkout, in turn

--repo / --vs are whose slurm/ scripts (and so whose eval code) the jobs run; the Python environment is this one's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from tests.slurm_cluster import NODE_IFNAME, SlurmCluster, split_inputs, write_env_file  # noqa: E402


def _seconds(record: dict, key: str) -> datetime:
    return datetime.fromisoformat(record[key])


def pipeline_file(root: Path, repo: Path, shared: Path, steps: int, every: int, limit: int,
                  eval_cpus: int) -> Path:
    split_inputs(repo, shared / "data" / "tinyshakespeare.txt", root / "input", files=2)
    site = write_env_file(root / "site.env", {
        "SITE_PARTITION": "debug", "SITE_ACCOUNT": "", "SITE_QOS": "",
        "SITE_GPUS_PER_NODE": 0, "SITE_CPUS_PER_NODE": 1, "SITE_EVAL_CPUS": eval_cpus,
        "SITE_TIME_PREP": "00:10:00", "SITE_TIME_TRAIN": "00:20:00", "SITE_TIME_EVAL": "00:20:00",
        "SITE_SIGNAL_SECONDS": 60, "SITE_ENV_SETUP": "", "SITE_NET_IFNAME": NODE_IFNAME,
    })
    overrides = [f"deepspeed={repo / 'configs' / 'deepspeed' / 'zero2.json'}", f"schedule.max_steps={steps}",
                 "optim.warmup_steps=2", f"checkpoint.every={every}", "checkpoint.keep_last=10",
                 f"eval.every={every}", "eval.val_batches=2", "sample.every=0"]
    return write_env_file(root / "bench.env", {
        "SITE": site, "PREP_SOURCE": "local", "PREP_INPUT": root / "input", "DATASET_DIR": root / "data",
        "PREP_TASKS": 2, "PREP_SHARD_TOKENS": 100000, "PREP_VAL_TOKENS": 20000,
        "TRAIN_RECIPE": repo / "configs" / "train" / "tiny-cpu.yaml", "TRAIN_OVERRIDES": overrides,
        "RUN_DIR": root / "run", "NODES": 1, "GPUS_PER_NODE": 1,
        "HELLASWAG": shared / "data" / "hellaswag_val.jsonl", "EVAL_LIMIT": limit, "EVAL_POLL": 2,
    })


def run_pipeline(cluster, root: Path, repo: Path, shared: Path, checkpoints: int, limit: int, eval_cpus: int):
    """Submit one tiny pipeline from `repo`; rows (tag, job, state, elapsed s, timings) of its eval jobs."""
    every = 2
    pipeline = pipeline_file(root, repo, shared, checkpoints * every, every, limit, eval_cpus)
    done = subprocess.run([str(repo / "slurm" / "submit.sh"), str(pipeline)], cwd=repo,
                          env=dict(cluster.env, PYTHON=sys.executable), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"submit.sh failed: {done.stdout}{done.stderr}")
    top = [line.split()[2] for line in done.stdout.splitlines() if ": job " in line]
    cluster.wait_jobs(top, timeout=1200)
    run = root / "run"
    submitted = {p.name.removesuffix(".submitted"): json.loads(p.read_text())["jobs"][-1]
                 for p in (run / "eval" / ".watch").glob("*.submitted")}
    cluster.wait_jobs(submitted.values(), timeout=600)
    ends = {r["JobId"]: r for r in cluster.completion_records()}
    rows = []
    for tag, job in sorted(submitted.items(), key=lambda kv: int(kv[0].removeprefix("global_step"))):
        record, result = ends[job], json.loads((run / "eval" / f"{tag}.json").read_text())
        elapsed = (_seconds(record, "EndTime") - _seconds(record, "StartTime")).total_seconds()
        rows.append((tag, job, record["JobState"], elapsed, result["timings"]))
    return rows


def print_rows(label: str, rows) -> None:
    print(f"\n{label}")
    print("| checkpoint | job | state | elapsed s | tasks s | model s | score s | start-up s (elapsed - score) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for tag, job, state, elapsed, t in rows:
        print(f"| {tag} | {job} | {state} | {elapsed:.0f} | {t['tasks_s']:.2f} | {t['model_s']:.2f} | "
              f"{t['score_s']:.2f} | {elapsed - t['score_s']:.1f} |")
    total, score = sum(r[3] for r in rows), sum(r[4]["score_s"] for r in rows)
    print(f"| all {len(rows)} | | | {total:.0f} | {sum(r[4]['tasks_s'] for r in rows):.2f} | "
          f"{sum(r[4]['model_s'] for r in rows):.2f} | {score:.2f} | {total - score:.1f} "
          f"({(total - score) / max(total, 1e-9):.0%}) |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=HERE, help="checkout whose slurm/ scripts the jobs run")
    p.add_argument("--vs", type=Path, help="a second checkout, run in turn with --repo on the same cluster")
    p.add_argument("--rounds", type=int, default=1, help="pipelines per checkout (in turn with --vs)")
    p.add_argument("--shared", type=Path, default=HERE.parent / "shared")
    p.add_argument("--checkpoints", type=int, default=4, help="checkpoints the run writes, so eval jobs")
    p.add_argument("--limit", type=int, default=20, help="HellaSwag docs per checkpoint (EVAL_LIMIT)")
    p.add_argument("--eval-cpus", type=int, default=4,
                   help="CPUs each eval job asks for (SITE_EVAL_CPUS); 4, a whole test node, runs them one at a "
                        "time beside training, so the 2 real cores are not shared by several eval jobs")
    args = p.parse_args()
    repos = [args.repo.resolve()] + ([args.vs.resolve()] if args.vs else [])
    shared = args.shared.resolve()
    cluster = SlurmCluster()
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-eval-jobs-") as tmp:
        try:
            cluster.start()
            for round_ in range(args.rounds):
                for i, repo in enumerate(repos):
                    root = Path(tmp) / f"r{round_}-{i}"
                    root.mkdir()
                    rows = run_pipeline(cluster, root, repo, shared, args.checkpoints, args.limit, args.eval_cpus)
                    print_rows(f"round {round_ + 1}, repo {repo}: {args.checkpoints} checkpoints, {args.limit} "
                               f"docs each, eval jobs of {args.eval_cpus} CPUs", rows)
                    ok = ok and all(r[2] == "COMPLETED" for r in rows)
        finally:
            cluster.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
