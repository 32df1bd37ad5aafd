"""The slurm/ stage on a real Slurm cluster: two slurmd nodes in network namespaces on this machine.

The tiny pipeline goes through slurm/submit.sh as a user would run it: a tokenize array of 2 tasks, finalize,
training on 2 nodes x 1 task with ZeRO-2 over gloo, and beside it the eval watcher, which submits one eval job
per complete checkpoint (EVAL_MODE=jobs, the default). All paths contain a space.
"""
import json
import re
import subprocess
import time

import pytest

from tests.conftest import PYTHON, REPO, SHARED
from tests.slurm_cluster import NODE_IFNAME, cluster_fixture, split_inputs, write_env_file

SUBMIT = str(REPO / "slurm" / "submit.sh")
FINAL_STEP = 6
PREEMPT_FINAL_STEP = 12
EXTERNAL_FINAL_STEP = 24     # long enough that each signal lands mid-run, even when steps are fast


@pytest.fixture(scope="module")
def slurm_cluster():
    yield from cluster_fixture()


def run_submit(cluster, pipeline, *flags):
    return subprocess.run([SUBMIT, str(pipeline), *flags], cwd=REPO, env=dict(cluster.env, PYTHON=PYTHON),
                          capture_output=True, text=True)


def submitted_jobs(stdout: str) -> dict[str, str]:
    """{stage: job id} from submit.sh's `STAGE: job ID (waits for ...)` lines."""
    return dict(re.findall(r"^(\w+): job (\d+) ", stdout, re.M))


def train_overrides(max_steps: int, every: int) -> list[str]:
    return [f"deepspeed={REPO / 'configs' / 'deepspeed' / 'zero2.json'}", f"schedule.max_steps={max_steps}",
            "optim.warmup_steps=2", f"checkpoint.every={every}", "checkpoint.keep_last=3", f"eval.every={every}",
            "eval.val_batches=2", "sample.every=0"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm") / "pipe line"
    root.mkdir()
    split_inputs(REPO, SHARED / "data" / "tinyshakespeare.txt", root / "input docs", files=2)
    site_file = write_env_file(root / "site file.env", {
        "SITE_PARTITION": "debug", "SITE_ACCOUNT": "", "SITE_QOS": "",
        "SITE_GPUS_PER_NODE": 0, "SITE_CPUS_PER_NODE": 1, "SITE_EVAL_CPUS": 1,
        "SITE_TIME_PREP": "00:10:00", "SITE_TIME_TRAIN": "00:20:00", "SITE_TIME_EVAL": "00:20:00",
        "SITE_SIGNAL_SECONDS": 60, "SITE_ENV_SETUP": "", "SITE_NET_IFNAME": NODE_IFNAME,
        "SITE_SBATCH_EXTRA": ["--comment=pipeline test"],
    })
    return root, site_file


def make_pipeline(site, name: str, run: str, overrides: list[str], **extra):
    root, site_file = site
    values = {
        "SITE": site_file, "PREP_SOURCE": "local", "PREP_INPUT": root / "input docs",
        "RAW_DIR": root / "input docs", "DATASET_DIR": root / "data set", "PREP_TASKS": 2,
        "PREP_SHARD_TOKENS": 100000, "PREP_VAL_TOKENS": 20000,
        "TRAIN_RECIPE": REPO / "configs" / "train" / "tiny-cpu.yaml", "TRAIN_OVERRIDES": overrides,
        "RUN_DIR": root / run, "NODES": 2, "GPUS_PER_NODE": 1,
        "HELLASWAG": SHARED / "data" / "hellaswag_val.jsonl", "EVAL_LIMIT": 20, "EVAL_POLL": 2,
    }
    values.update(extra)
    return write_env_file(root / f"{name}.env", values)


def eval_jobs(run) -> dict[str, list[str]]:
    """{tag: ids of the eval jobs submitted for it} from the watcher's submission records."""
    return {p.name.removesuffix(".submitted"): json.loads(p.read_text())["jobs"]
            for p in sorted((run / "eval" / ".watch").glob("*.submitted"))}


def assert_one_eval_job_per_checkpoint(cluster, run) -> list[str]:
    """Every complete checkpoint got exactly one eval job, which COMPLETED, ran once and recorded it once."""
    from train.rundir.checkpoints import complete_tags
    checkpoints = [p.name for p in complete_tags(run / "checkpoints")]
    scored = [json.loads(line)["tag"] for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    jobs = eval_jobs(run)
    assert sorted(scored) == sorted(checkpoints) == sorted(jobs), (scored, checkpoints, jobs)
    assert all(len(ids) == 1 for ids in jobs.values()), jobs            # never submitted twice
    ids = [ids[0] for ids in jobs.values()]
    assert cluster.wait_jobs(ids, timeout=120) == {j: "COMPLETED" for j in ids}
    ends = [r for r in cluster.completion_records() if r["JobId"] in ids]
    assert sorted(r["JobId"] for r in ends) == sorted(ids), ends        # each ran once: no requeue, no rerun
    assert {r["Name"] for r in ends} == {"eval"}
    summary = (run / "logs" / "summary.txt").read_text()
    assert all(f" eval {j} ok " in summary for j in ids), summary
    return ids


def train_steps(run_dir) -> list[int]:
    if not (run_dir / "metrics.jsonl").exists():
        return []
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [rec["step"] for rec in lines if "loss" in rec]


def wait_until(ready, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_two_node_job_runs_on_both_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "hostname.out"
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={out}", "--wrap", "srun hostname"],
                               env=slurm_cluster.env, capture_output=True, text=True, check=True)
    job = submitted.stdout.strip()
    assert slurm_cluster.wait_jobs([job], timeout=60) == {job: "COMPLETED"}, slurm_cluster.logs_tail()
    assert sorted(out.read_text().split()) == ["nodea", "nodeb"]
    assert [r["JobState"] for r in slurm_cluster.completion_records() if r["JobId"] == job] == ["COMPLETED"]


@pytest.mark.parametrize("problem", ["missing site file", "recipe fails validation", "GPUs do not divide batch"])
def test_bad_input_is_refused_before_anything_is_submitted(slurm_cluster, site, problem):
    root, _ = site
    extra = {"missing site file": {"SITE": root / "no such site.env"},
             "recipe fails validation": {"TRAIN_OVERRIDES": "optim.no_such_key=1"},
             "GPUs do not divide batch": {"GPUS_PER_NODE": 3}}[problem]
    pipeline = make_pipeline(site, "bad", "bad run", train_overrides(FINAL_STEP, 3), **extra)
    queue_before = len(slurm_cluster.completion_records()), slurm_cluster.squeue()
    done = run_submit(slurm_cluster, pipeline)
    assert done.returncode == 1, done.stdout + done.stderr
    expected = {"missing site file": "site file not found", "recipe fails validation": "no_such_key",
                "GPUs do not divide batch": "not a multiple of"}[problem]
    assert expected in done.stderr and done.stderr.startswith("error: "), done.stderr
    assert (len(slurm_cluster.completion_records()), slurm_cluster.squeue()) == queue_before
    assert not (root / "bad run").exists()   # no logs dir, no jobs.txt: nothing was submitted


def test_sbatch_failing_mid_chain_cancels_what_was_submitted(slurm_cluster, site):
    root, site_file = site
    bad_site = root / "bad time site.env"
    bad_site.write_text(site_file.read_text() + "SITE_TIME_TRAIN=not-a-time\n")   # only sbatch notices
    pipeline = make_pipeline(site, "half", "half run", train_overrides(FINAL_STEP, 3), SITE=bad_site,
                             DATASET_DIR=root / "half data")
    done = run_submit(slurm_cluster, pipeline)
    assert done.returncode == 1
    assert "error: sbatch failed for train; cancelled the jobs already submitted" in done.stderr, done.stderr
    jobs = submitted_jobs(done.stdout)
    assert list(jobs) == ["prep_tokenize", "prep_finalize"]
    assert slurm_cluster.wait_jobs(jobs.values(), timeout=60) == {j: "CANCELLED" for j in jobs.values()}
    assert not (root / "half data" / "manifest.json").exists()


@pytest.fixture(scope="module")
def first_pipeline(slurm_cluster, site):
    pipeline = make_pipeline(site, "first", "run one", train_overrides(FINAL_STEP, 3))
    done = run_submit(slurm_cluster, pipeline)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = submitted_jobs(done.stdout)
    states = slurm_cluster.wait_jobs(jobs.values(), timeout=400)
    return site[0], done, jobs, states


def test_pipeline_runs_every_stage_to_completion(slurm_cluster, first_pipeline):
    root, done, jobs, states = first_pipeline
    run = root / "run one"
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run / "logs").glob("*.out")))
    assert list(jobs) == ["prep_tokenize", "prep_finalize", "train", "eval_watch"], done.stdout
    assert states == {j: "COMPLETED" for j in jobs.values()}, logs
    assert "waits for prep_tokenize to succeed" in done.stdout
    assert len(list((run / "logs").glob("pipeline-*.env"))) == 1   # the jobs read the pipeline as submitted
    # the tokenize array ran 2 tasks, both recorded by the controller's job completion log
    tasks = slurm_cluster.job_records(jobs["prep_tokenize"])
    assert sorted(r["ArrayTaskId"] for r in tasks) == ["0", "1"]
    task_ids = {r["JobId"] for r in tasks}
    assert [r["JobState"] for r in slurm_cluster.completion_records() if r["JobId"] in task_ids] == ["COMPLETED"] * 2
    assert len(list((run / "logs").glob(f"prep_tokenize-{jobs['prep_tokenize']}_*.out"))) == 2
    # training ran as 2 ranks, one per node, rendezvous on the first node over the node interface
    train_log = (run / "logs" / f"train-{jobs['train']}.out").read_text()
    assert "rendezvous: nodea:" in train_log and "2 tasks on 2 node(s)" in train_log
    train_record = next(r for r in slurm_cluster.completion_records() if r["JobId"] == jobs["train"])
    assert train_record["NodeList"] == "nodea,nodeb"


def test_pipeline_outputs_dataset_checkpoints_eval_and_report(first_pipeline):
    root, _, _, _ = first_pipeline
    run = root / "run one"
    verify = subprocess.run([PYTHON, "-m", "prep", "verify", str(root / "data set")], cwd=REPO,
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{FINAL_STEP}"
    assert train_steps(run)[-1] == FINAL_STEP                 # metrics count steps completed
    scored = [json.loads(line)["tag"] for line in (run / "eval" / "results.jsonl").read_text().splitlines()]
    assert sorted(scored) == ["global_step3", f"global_step{FINAL_STEP}"]
    for tag in scored:
        assert (run / "eval" / f"{tag}.json").exists()
    report = (run / "eval" / "report.md").read_text()
    assert re.search(r"^\| 3 \|", report, re.M) and re.search(rf"^\| {FINAL_STEP} \|", report, re.M), report
    assert (run / "eval" / "curves.png").stat().st_size > 0
    summary = (run / "logs" / "summary.txt").read_text()
    assert summary.count(" ok ") == 5 + len(eval_jobs(run)) and "FAILED" not in summary, summary


def test_each_checkpoint_gets_its_own_eval_job_from_a_watcher_without_a_gpu(slurm_cluster, first_pipeline):
    """EVAL_MODE=jobs: the watcher job only submits (1 CPU, no GPU requested), each checkpoint's eval job scores
    it, appends its line and re-renders the report; the watcher ends once every one of them has."""
    root, _, jobs, _ = first_pipeline
    run = root / "run one"
    ids = assert_one_eval_job_per_checkpoint(slurm_cluster, run)
    assert len(ids) == 2                                                # global_step3 and the final step
    watcher = slurm_cluster.job_records(jobs["eval_watch"])[0]
    assert watcher["NumCPUs"] == "1" and "gpu" not in watcher.get("TresPerNode", ""), watcher
    watch_log = (run / "logs" / f"eval_watch-{jobs['eval_watch']}.out").read_text()
    assert "scoring " not in watch_log and watch_log.count("submitted eval job") == 2, watch_log
    for job in ids:
        log = (run / "logs" / f"eval-{job}.out").read_text()
        assert "scored: hellaswag acc_norm" in log and "wrote " in log and "report.md" in log, log


def start_training(cluster, site, name: str, max_steps: int):
    """Submit a run on the dataset the first pipeline made; return once training has logged a step."""
    run = site[0] / f"{name} run"
    pipeline = make_pipeline(site, name, run.name, train_overrides(max_steps, max_steps), EVAL_LIMIT=8)
    done = run_submit(cluster, pipeline)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = submitted_jobs(done.stdout)
    wait_until(lambda: train_steps(run), "the first training step")
    return run, jobs, done


def test_second_submit_reuses_dataset_and_training_survives_preemption(slurm_cluster, site, first_pipeline):
    run, jobs, done = start_training(slurm_cluster, site, "second", PREEMPT_FINAL_STEP)
    assert list(jobs) == ["train", "eval_watch"], done.stdout      # the dataset is reused: no prep jobs
    assert "reusing dataset" in done.stdout
    # mid-run, training has logged a step: send it the time-limit signal, as Slurm would
    subprocess.run(["scancel", "--signal=USR1", jobs["train"]], env=slurm_cluster.env, check=True)
    states = slurm_cluster.wait_jobs(jobs.values(), timeout=400)
    train_log = (run / "logs" / f"train-{jobs['train']}.out").read_text()
    assert states == {j: "COMPLETED" for j in jobs.values()}, train_log[-4000:]
    assert slurm_cluster.job_records(jobs["train"])[0]["Restarts"] == "1"
    assert "requeueing job" in train_log and "restart 1" in train_log
    assert re.search(r"resuming from .*global_step\d+ at step \d+", train_log), train_log[-4000:]
    # one log across both attempts, every step exactly once, ending where an uninterrupted run ends
    assert train_steps(run) == list(range(1, PREEMPT_FINAL_STEP + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{PREEMPT_FINAL_STEP}"
    assert (run / "eval" / "report.md").exists()


def test_training_survives_sigterm_and_an_external_requeue(slurm_cluster, site, first_pipeline):
    """The two other ways a running training job is stopped: SIGTERM to its steps only (`scancel --signal=TERM`,
    or a preemption's first notice), which the job script turns into a requeue as for USR1; and a requeue from
    outside (`scontrol requeue`, as an admin or a preempting job's requeue does), where Slurm sends SIGTERM to the
    batch script and the steps, SIGKILL after KillWait, and requeues the job itself."""
    run, jobs, _ = start_training(slurm_cluster, site, "third", EXTERNAL_FINAL_STEP)
    train_job = jobs["train"]
    train_log = run / "logs" / f"train-{train_job}.out"
    subprocess.run(["scancel", "--signal=TERM", train_job], env=slurm_cluster.env, check=True)
    # the second attempt has started once its script prints `restart 1`: the first one's steps are all logged
    wait_until(lambda: train_log.exists() and "restart 1" in train_log.read_text(), "the job's first restart")
    first_attempt = len(train_steps(run))
    wait_until(lambda: len(train_steps(run)) > first_attempt, "a step of the second attempt")
    assert slurm_cluster.job_state(train_job) == "RUNNING"
    subprocess.run(["scontrol", "requeue", train_job], env=slurm_cluster.env, check=True)

    states = slurm_cluster.wait_jobs(jobs.values(), timeout=400)
    log = train_log.read_text()
    assert states == {j: "COMPLETED" for j in jobs.values()}, log[-4000:]
    # two restarts, no more: the job script requeued after SIGTERM, Slurm alone after its own requeue
    assert slurm_cluster.job_records(train_job)[0]["Restarts"] == "2", log[-4000:]
    assert [r["JobState"] for r in slurm_cluster.completion_records() if r["JobId"] == train_job] == \
        ["PENDING", "PENDING", "COMPLETED"]     # jobcomp logs a requeued run as PENDING
    assert log.count("requeueing job") == 1 and "restart 2" in log, log[-4000:]
    assert "pending execution" not in log, log[-4000:]          # no second `scontrol requeue` of a requeued job
    # both stops saved the step in progress: each attempt resumed where the last one ended, no step lost or redone
    assert len(re.findall(r"resuming from .*global_step\d+ at step \d+", log)) == 2, log[-4000:]
    assert train_steps(run) == list(range(1, EXTERNAL_FINAL_STEP + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{EXTERNAL_FINAL_STEP}"
    assert (run / "eval" / "report.md").exists()
    summary = (run / "logs" / "summary.txt").read_text()
    train_lines = [line for line in summary.splitlines() if f" train {train_job} " in line]
    outcomes = [line.split(f" train {train_job} ")[1].split(" log: ")[0] for line in train_lines]
    assert outcomes == ["requeued (exit 99)", "requeued by Slurm (exit 99)", "ok"], summary
    assert "FAILED" not in summary and f"eval_watch {jobs['eval_watch']} ok" in summary, summary
    # one eval job per checkpoint (the two stops' and the final one), none again after the requeues
    assert len(assert_one_eval_job_per_checkpoint(slurm_cluster, run)) == 3


def test_cancelled_training_saves_and_is_not_requeued(slurm_cluster, site, first_pipeline):
    """`scancel JOB`: Slurm sends SIGTERM to the script and the tasks and ends the job. The trainer still saves
    the step in progress, and the script, which now outlives the signal, must not requeue a cancelled job."""
    run, jobs, _ = start_training(slurm_cluster, site, "cancelled", EXTERNAL_FINAL_STEP)
    train_job = jobs["train"]
    subprocess.run(["scancel", train_job], env=slurm_cluster.env, check=True)
    states = slurm_cluster.wait_jobs(jobs.values(), timeout=120)
    log = (run / "logs" / f"train-{train_job}.out").read_text()
    assert states == {train_job: "CANCELLED", jobs["eval_watch"]: "FAILED"}, log[-4000:]
    assert slurm_cluster.job_records(train_job)[0]["Restarts"] == "0"
    assert [r["JobState"] for r in slurm_cluster.completion_records() if r["JobId"] == train_job] == ["CANCELLED"]
    last = train_steps(run)[-1]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{last}"
    summary = (run / "logs" / "summary.txt").read_text()
    assert f"train {train_job} stopped by Slurm (exit 99)" in summary, summary
    assert f"error: training job {train_job} ended CANCELLED" in \
        (run / "logs" / f"eval_watch-{jobs['eval_watch']}.out").read_text()


def test_failed_stage_cancels_its_dependents(slurm_cluster, site):
    root, _ = site
    bad_input = root / "bad input"
    bad_input.mkdir()
    (bad_input / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    pipeline = make_pipeline(site, "broken", "broken run", train_overrides(FINAL_STEP, 3),
                             PREP_INPUT=bad_input, RAW_DIR=bad_input, DATASET_DIR=root / "broken data", PREP_TASKS=1)
    done = run_submit(slurm_cluster, pipeline)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = submitted_jobs(done.stdout)
    states = slurm_cluster.wait_jobs(jobs.values(), timeout=120)
    assert states == {jobs["prep_tokenize"]: "FAILED", jobs["prep_finalize"]: "CANCELLED",
                      jobs["train"]: "CANCELLED", jobs["eval_watch"]: "CANCELLED"}
    summary = (root / "broken run" / "logs" / "summary.txt").read_text()
    log = root / "broken run" / "logs" / f"prep_tokenize-{jobs['prep_tokenize']}_0.out"
    assert f"prep_tokenize {jobs['prep_tokenize']}_0 FAILED (exit 1) log: {log}" in summary
    assert "malformed JSON" in log.read_text()


def test_eval_watcher_stops_when_training_fails(slurm_cluster, site, first_pipeline):
    # passes the recipe check, but the trainer refuses it at startup: the dataset's vocabulary is larger
    overrides = train_overrides(FINAL_STEP, 3) + ["model.vocab_size=1000"]
    pipeline = make_pipeline(site, "doomed", "doomed run", overrides)
    done = run_submit(slurm_cluster, pipeline)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = submitted_jobs(done.stdout)
    assert slurm_cluster.wait_jobs(jobs.values(), timeout=180) == {jobs["train"]: "FAILED",
                                                                   jobs["eval_watch"]: "FAILED"}
    watch_log = (site[0] / "doomed run" / "logs" / f"eval_watch-{jobs['eval_watch']}.out").read_text()
    assert f"error: training job {jobs['train']} ended FAILED" in watch_log
    summary = (site[0] / "doomed run" / "logs" / "summary.txt").read_text()
    assert f"train {jobs['train']} FAILED" in summary and f"eval_watch {jobs['eval_watch']} FAILED" in summary
