"""slurm/: the pipeline file's parser, the plan and the executor's Slurm side, against a fake sbatch / scancel /
scontrol / srun on PATH (shell scripts that log their arguments): fast, no root, no Slurm. The real two-node cluster
(tests/test_slurm_cluster.py) stays the acceptance test."""
import json
import os
import shlex
import subprocess
import textwrap

import pytest

from slurm import envfile, jobs
from slurm.config import ConfigError, read_pipeline
from tests.conftest import PYTHON, REPO, SHARED
from tests.fixtures_run import FAST
from tests.slurm_cluster import write_env_file

SUBMIT = str(REPO / "slurm" / "submit.sh")
STAGE = str(REPO / "slurm" / "stage.sbatch")
HELLASWAG = SHARED / "data" / "hellaswag_val.jsonl"

FAKES = {
    # sbatch: the next job id, or failure for the job named in FAIL_JOB (as sbatch refusing a bad --time)
    "sbatch": """
        n=$(( $(cat "$FAKE_LOG/count" 2>/dev/null || echo 100) + 1 )); echo "$n" > "$FAKE_LOG/count"
        for a in "$@"; do [ "$a" != "--job-name=${FAIL_JOB:-}" ] || { echo "sbatch: error: bad" >&2; exit 1; }; done
        printf '%q ' "$@" >> "$FAKE_LOG/sbatch"; echo >> "$FAKE_LOG/sbatch"
        echo "$n"
    """,
    "scancel": 'echo "$@" >> "$FAKE_LOG/scancel"',
    # scontrol show job -o ID: JOB_STATE / RESTARTS; scontrol requeue ID: logged, then Slurm's SIGTERM to the job
    "scontrol": """
        echo "$@" >> "$FAKE_LOG/scontrol"
        case "$1 $2" in
            "show job") echo "JobId=$4 JobName=x JobState=${JOB_STATE:-RUNNING} Restarts=${RESTARTS:-0} NumCPUs=1" ;;
            "show hostnames") echo "$3" ;;
            requeue*) (sleep 1; kill -TERM "$PPID") > /dev/null 2>&1 & ;;
        esac
    """,
    # srun: the environment it was given, then the exit status the test asks for
    "srun": 'env > "$FAKE_LOG/srun.env"; echo "srun $*" >> "$FAKE_LOG/srun"; exit "${SRUN_EXIT:-0}"',
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "fake log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + textwrap.dedent(body))
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), PYTHON=PYTHON)
    for var in [v for v in env if v.startswith("SLURM_")] + ["TRAIN_JOB_ID"]:
        env.pop(var, None)
    return env, log


def site_file(root, name="site file.env", **extra):
    values = {"SITE_PARTITION": "gpu", "SITE_GPUS_PER_NODE": 8, "SITE_CPUS_PER_NODE": 64, "SITE_SIGNAL_SECONDS": 300}
    values.update(extra)
    return write_env_file(root / name, values)


def pipeline(root, **extra):
    (root / "in put").mkdir(exist_ok=True)
    (root / "in put" / "docs.jsonl").write_text('{"text": "hello"}\n')
    values = {"SITE": site_file(root), "PREP_INPUT": root / "in put", "DATASET_DIR": root / "data set",
              "TRAIN_RECIPE": REPO / "configs" / "train" / "tiny-cpu.yaml", "RUN_DIR": root / "run dir",
              "HELLASWAG": HELLASWAG, "PREP_TASKS": 2}
    values.update(extra)
    return write_env_file(root / "p.env", {k: v for k, v in values.items() if v is not None})


def run(cmd, env, cwd=REPO):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


# ---- the pipeline file ---------------------------------------------------------------------------------------

def test_the_parser_reads_shell_values_without_running_them(tmp_path):
    f = tmp_path / "x.env"
    f.write_text(textwrap.dedent("""\
        # a comment
        A=plain   # trailing comment
        B='single $HOME # not a comment'
        C="double ${A} \\"quoted\\" \\$"
        D=it"'"s\\ joined
        E=(one "two words"
           # a comment inside
           "$A=0.7" 'x=1=y')
        F=
        G=a#b
        A=again
    """))
    got = {k: s.value for k, s in envfile.read(f, env={"HOME": "/home/u"}).items()}
    assert got == {"A": "again", "B": "single $HOME # not a comment", "C": 'double plain "quoted" $',
                   "D": "it's joined", "E": ("one", "two words", "plain=0.7", "x=1=y"), "F": "", "G": "a#b"}


@pytest.mark.parametrize("text, message", [
    ("A=1\nB=$(rm -rf x)\n", "line 2: $(...) in a value"),
    ("A=1;rm x\n", "line 1: ';' in a value"),
    ("A=one two\n", "line 1: A: more than one word after '='"),
    ("rm -rf /\n", "line 1: not a KEY=value line: 'rm -rf /'"),
    ("A='open\n", "a ' is never closed"),
    ("A=$NOPE_NOT_SET\n", "line 1: $NOPE_NOT_SET is not set"),
])
def test_the_parser_refuses_what_is_not_data_naming_the_line(tmp_path, text, message):
    f = tmp_path / "x.env"
    f.write_text(text)
    with pytest.raises(envfile.EnvFileError, match=r"x\.env") as err:
        envfile.read(f, env={})
    assert message in str(err.value)


def test_an_unknown_key_is_refused_with_the_known_ones_named(tmp_path, fake_slurm):
    env, log = fake_slurm
    p = pipeline(tmp_path)
    p.write_text(p.read_text() + "PREP_TASK=4\n")
    done = run([SUBMIT, str(p), "--dry-run"], env)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    line = p.read_text().count("\n")
    assert done.stderr.startswith(f"error: unknown key PREP_TASK in {p} line {line}; known: ")
    known = done.stderr.split("; known: ")[1].strip().split(", ")
    assert {"PREP_TASKS", "SITE", "TRAIN_MIX", "TRAIN_ALLOW_CHANGE", "LOG_DIR"} <= set(known) and done.stdout == ""
    assert not (tmp_path / "run dir").exists()


def test_the_site_file_is_read_by_the_same_parser_with_its_own_keys(tmp_path, fake_slurm):
    env, _ = fake_slurm
    site = site_file(tmp_path, "typo site.env", SITE_PARTITON="typo")
    done = run([SUBMIT, str(pipeline(tmp_path, SITE=site)), "--dry-run"], env)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: unknown key SITE_PARTITON in {site} line 5; known: SITE_PARTITION, "
                                  "SITE_CPU_PARTITION"), done.stderr


@pytest.mark.parametrize("key, value, message", [
    ("NODES", "two", "NODES must be a positive whole number, got 'two'"),
    ("PREP_TASKS", "0", "PREP_TASKS must be a positive whole number, got '0'"),
    ("EVAL_MODE", "sometimes", "EVAL_MODE must be jobs (a short eval job per checkpoint) or watch"),
    ("PREP_SOURCE", "s3", "PREP_SOURCE must be fineweb-edu, fineweb or local, got 's3'"),
    ("TRAIN_MIX", "x=0", "TRAIN_MIX[0] 'x=0' is not DIR=WEIGHT or DIR=WEIGHT=NAME"),
    ("EVAL_POLL", "99999999999999999999", "EVAL_POLL must be a positive number of seconds, at most 86400"),
    ("PREP_TASKS", "1e12", "PREP_TASKS must be at most 4,000,000 (the most array tasks any Slurm allows"),
    ("FINALIZE_TASKS", "5M", "FINALIZE_TASKS must be at most 4,000,000"),
])
def test_a_bad_value_is_one_line_naming_file_and_line(tmp_path, key, value, message):
    p = pipeline(tmp_path, **{key: value})
    line = next(i for i, text in enumerate(p.read_text().splitlines(), 1) if text.startswith(f"{key}="))
    with pytest.raises(ConfigError) as err:
        read_pipeline(p)
    assert str(err.value) == f"{p} line {line}: {message}" or str(err.value).startswith(f"{p} line {line}: {message}")


def test_prep_workers_beyond_a_node_are_refused_at_submit(tmp_path, fake_slurm):
    # A tokenize job asking for more CPUs than any node has would pend forever.
    env, _ = fake_slurm
    done = run([SUBMIT, str(pipeline(tmp_path, PREP_WORKERS="1e6")), "--dry-run"], env)
    assert done.returncode == 1 and done.stderr == ("error: PREP_WORKERS=1000000 but the site's nodes have 64 CPUs "
                                                    "(each tokenize task asks for PREP_WORKERS CPUs on one node)\n")


def test_a_malformed_hellaswag_file_is_refused_at_submit_naming_its_line(tmp_path, fake_slurm):
    # It was only checked to exist: the eval job found the bad doc after prep and training had run.
    env, log = fake_slurm
    bad = tmp_path / "hellaswag.jsonl"
    lines = HELLASWAG.read_text().splitlines(keepends=True)[:5]
    lines[3] = json.dumps({**json.loads(lines[3]), "label": 7}) + "\n"
    bad.write_text("".join(lines))
    done = run([SUBMIT, str(pipeline(tmp_path, HELLASWAG=bad)), "--dry-run"], env)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: HELLASWAG: {bad}:4: ") and done.stdout == "", done.stderr
    assert not (tmp_path / "run dir").exists()


def test_train_mix_reaches_the_recipe_as_values(tmp_path):
    own = tmp_path / "it's = [a], #set"
    p = read_pipeline(pipeline(tmp_path, DATASET_DIR=own, TRAIN_MIX=[f"{own}=7=mine", f"{tmp_path / 'b'}=1e-1"]))
    other = str(tmp_path / "b")
    assert p.mix_value() == [{"dir": str(own), "weight": 7, "name": "mine"}, {"dir": other, "weight": 0.1}]
    from train.recipe import load
    recipe = load(p.TRAIN_RECIPE, p.train_sets())   # train's own loader reads what train will be given
    assert [(e.dir, e.weight, e.name) for e in recipe.data.mix] == [(str(own), 7, "mine"), (other, 0.1, None)]


def test_help_prints_usage_and_exits_0(fake_slurm):
    env, _ = fake_slurm
    done = run([SUBMIT, "--help"], env)
    assert done.returncode == 0 and done.stdout.startswith("usage: slurm/submit.sh"), done.stdout + done.stderr
    assert "--dry-run" in done.stdout and "--local" in done.stdout
    done = run([SUBMIT], env)
    assert done.returncode == 2 and done.stderr.startswith("error: slurm/submit.sh: "), done.stderr


# ---- the plan and the Slurm executor -------------------------------------------------------------------------

def sbatch_lines(log) -> list[list[str]]:
    return [shlex.split(line) for line in (log / "sbatch").read_text().splitlines()]


def test_the_chain_is_submitted_with_afterok_and_the_jobs_read_a_copy(tmp_path, fake_slurm):
    env, log = fake_slurm
    p = pipeline(tmp_path)
    done = run([SUBMIT, str(p)], env)
    assert done.returncode == 0, done.stderr
    lines = sbatch_lines(log)
    assert [line[-3:-1] for line in lines] == [[STAGE, s] for s in ("prep_tokenize", "prep_finalize", "train",
                                                                    "eval_watch")]
    copy = lines[0][-1]
    assert copy.startswith(str(tmp_path / "run dir" / "logs" / "pipeline-")) and open(copy).read() == p.read_text()
    assert "--dependency=afterok:101" in lines[1] and "--dependency=afterok:102" in lines[2]
    assert {"--dependency=after:103,afterok:102", "--export=ALL,TRAIN_JOB_ID=103"} <= set(lines[3])
    assert (tmp_path / "run dir" / "logs" / "jobs.txt").read_text().split() == [
        "prep_tokenize", "101", "prep_finalize", "102", "train", "103", "eval_watch", "104"]
    assert "eval_watch: job 104 (waits for train to start, prep_finalize to succeed)" in done.stdout


def test_an_sbatch_failing_mid_chain_cancels_what_was_submitted(tmp_path, fake_slurm):
    env, log = fake_slurm
    done = run([SUBMIT, str(pipeline(tmp_path))], dict(env, FAIL_JOB="train"))
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == ("error: sbatch failed for train; cancelled the jobs already submitted "
                                            "(101 102)"), done.stderr
    assert (log / "scancel").read_text().split() == ["101", "102"]


def test_the_dry_run_prints_the_sbatch_lines_of_the_shipped_pipeline(tmp_path, fake_slurm):
    """configs/pipelines/gpt2-124m-edu10B.env with slurm/site.env.example: the lines the bash submit.sh printed,
    with slurm/stage.sbatch STAGE for slurm/STAGE.sbatch."""
    env, log = fake_slurm
    site = tmp_path / "site.env"
    site.write_text((REPO / "slurm" / "site.env.example").read_text())
    text = (REPO / "configs" / "pipelines" / "gpt2-124m-edu10B.env").read_text()
    p = tmp_path / "p.env"
    p.write_text(text.replace("SITE=slurm/site.env", f"SITE={site}")
                 .replace("HELLASWAG=data/eval/hellaswag_val.jsonl", f"HELLASWAG={HELLASWAG}"))
    done = run([SUBMIT, str(p), "--dry-run"], env)
    assert done.returncode == 0, done.stderr
    assert not (log / "sbatch").exists()
    logs = f"{REPO}/runs/gpt2-124m-edu10B/logs"
    head = f"sbatch --parsable --chdir={REPO} --kill-on-invalid-dep=yes --partition=gpu"
    expected = [
        f"{head} --job-name=prep_download --output={logs}/prep_download-%j.out --nodes=1 --ntasks=1 --cpus-per-task=1 "
        f"--time=04:00:00 {STAGE} prep_download {p}",
        f"{head} --job-name=prep_tokenize --output={logs}/prep_tokenize-%A_%a.out --array=0-15 --nodes=1 --ntasks=1 "
        f"--cpus-per-task=8 --time=04:00:00 --dependency=afterok:\\<prep_download\\> {STAGE} prep_tokenize {p}",
        f"{head} --job-name=prep_finalize --output={logs}/prep_finalize-%A_%a.out --array=0-6 --nodes=1 --ntasks=1 "
        f"--cpus-per-task=8 --time=04:00:00 --dependency=afterok:\\<prep_tokenize\\> {STAGE} prep_finalize {p}",
        f"{head} --job-name=train --output={logs}/train-%j.out --nodes=2 --ntasks-per-node=8 --cpus-per-task=8 "
        f"--time=24:00:00 --signal=USR1@300 --requeue --open-mode=append --gpus-per-node=gpu:8 "
        f"--dependency=afterok:\\<prep_finalize\\> {STAGE} train {p}",
        f"{head} --job-name=eval_watch --output={logs}/eval_watch-%j.out --nodes=1 --ntasks=1 --cpus-per-task=1 "
        f"--time=24:00:00 --dependency=after:\\<train\\>\\,afterok:\\<prep_finalize\\> "
        f"--export=ALL\\,TRAIN_JOB_ID=\\<train\\> {STAGE} eval_watch {p}",
    ]
    assert [line for line in done.stdout.splitlines() if line.startswith("sbatch ")] == expected
    assert "16 processes x micro_batch 32" in done.stdout
    assert not (REPO / "runs").exists()


def test_cpu_stages_go_to_the_cpu_partition_and_account(tmp_path, fake_slurm):
    env, log = fake_slurm
    site = site_file(tmp_path, "cpu site.env", SITE_ACCOUNT="gpu-acct", SITE_CPU_PARTITION="cpu",
                     SITE_CPU_ACCOUNT="cpu-acct")
    done = run([SUBMIT, str(pipeline(tmp_path, SITE=site)), "--dry-run"], env)
    assert done.returncode == 0, done.stderr
    where = {line.split("--job-name=")[1].split()[0]: (line.split("--partition=")[1].split()[0],
                                                       line.split("--account=")[1].split()[0])
             for line in done.stdout.splitlines() if line.startswith("sbatch ") or line.startswith("eval jobs")}
    assert where == {"prep_tokenize": ("cpu", "cpu-acct"), "prep_finalize": ("cpu", "cpu-acct"),
                     "train": ("gpu", "gpu-acct"), "eval_watch": ("cpu", "cpu-acct"), "eval": ("gpu", "gpu-acct")}
    # without SITE_CPU_PARTITION, every job goes to SITE_PARTITION
    done = run([SUBMIT, str(pipeline(tmp_path, SITE=site_file(tmp_path))), "--dry-run"], env)
    assert {line.split("--partition=")[1].split()[0] for line in done.stdout.splitlines()
            if line.startswith("sbatch ")} == {"gpu"}


def test_a_watching_eval_watcher_holds_a_gpu_in_the_gpu_partition(tmp_path, fake_slurm):
    env, _ = fake_slurm
    site = site_file(tmp_path, "cpu site.env", SITE_CPU_PARTITION="cpu")
    done = run([SUBMIT, str(pipeline(tmp_path, SITE=site, EVAL_MODE="watch")), "--dry-run"], env)
    watch = next(line for line in done.stdout.splitlines() if "eval_watch " in line and line.startswith("sbatch"))
    assert "--partition=gpu" in watch and "--gpus-per-node=gpu:1" in watch


# ---- resuming a run ------------------------------------------------------------------------------------------

def resume_pipeline(root, tiny_run, tiny_dataset, **extra):
    return pipeline(root, PREP_INPUT=tiny_dataset.parent / "docs.jsonl", DATASET_DIR=tiny_dataset,
                    PREP_SHARD_TOKENS=100000, PREP_VAL_TOKENS=20000, RUN_DIR=tiny_run, PREP_TASKS=1, **extra)


def test_a_run_dir_with_another_recipe_is_refused_before_anything_is_submitted(tmp_path, fake_slurm, tiny_run,
                                                                               tiny_dataset):
    env, log = fake_slurm
    before = sorted(p.name for p in tiny_run.rglob("*"))
    same = resume_pipeline(tmp_path, tiny_run, tiny_dataset, TRAIN_OVERRIDES=FAST)
    done = run([SUBMIT, str(same), "--dry-run"], env)
    assert done.returncode == 0 and "resuming " in done.stdout, done.stderr
    changed = resume_pipeline(tmp_path, tiny_run, tiny_dataset, TRAIN_OVERRIDES=[*FAST, "optim.max_lr=0.5"])
    done = run([SUBMIT, str(changed)], env)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: RUN_DIR {tiny_run} holds a run to resume: the recipe differs")
    assert "optim.max_lr" in done.stderr and "TRAIN_ALLOW_CHANGE" in done.stderr
    assert not (log / "sbatch").exists() and sorted(p.name for p in tiny_run.rglob("*")) == before
    allowed = resume_pipeline(tmp_path, tiny_run, tiny_dataset, TRAIN_OVERRIDES=[*FAST, "optim.max_lr=0.5"],
                              TRAIN_ALLOW_CHANGE="optim.max_lr")
    done = run([SUBMIT, str(allowed), "--dry-run"], env)
    assert done.returncode == 0, done.stderr
    assert "optim.max_lr" in done.stdout
    argv = read_pipeline(allowed).train_argv()
    assert argv[argv.index("--allow-change") + 1] == "optim.max_lr"


# ---- the stages under (fake) Slurm -----------------------------------------------------------------------------

def slurm_env(env, **values):
    return dict(env, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node1", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="2",
                SLURM_CPUS_PER_TASK="6", **values)


def test_train_srun_exports_cpus_per_task_and_expandable_segments(tmp_path, fake_slurm):
    env, log = fake_slurm
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    done = run(["bash", str(REPO / "slurm" / "train_srun.sh"), "python", "-m", "train"], slurm_env(env))
    assert done.returncode == 0, done.stderr
    srun_env = dict(line.split("=", 1) for line in (log / "srun.env").read_text().splitlines() if "=" in line)
    assert srun_env["SRUN_CPUS_PER_TASK"] == "6"
    assert srun_env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert (log / "srun").read_text() == "srun --wait=120 python -m train\n"
    done = run(["bash", str(REPO / "slurm" / "train_srun.sh"), "true"],
               slurm_env(env, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync"))
    srun_env = dict(line.split("=", 1) for line in (log / "srun.env").read_text().splitlines() if "=" in line)
    assert srun_env["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"


@pytest.mark.parametrize("job_state, restarts, outcome", [
    ("RUNNING", "0", "requeued (exit 99)"),            # USR1 to the tasks: the stage requeues
    ("COMPLETING", "1", "requeued by Slurm (exit 99)"),  # scontrol requeue: Slurm does
    ("COMPLETING", "0", "stopped by Slurm (exit 99)"),   # scancel: nobody does
])
def test_the_train_stage_decides_who_requeues(tmp_path, fake_slurm, job_state, restarts, outcome):
    env, log = fake_slurm
    p = pipeline(tmp_path)
    done = run(["bash", STAGE, "train", str(p)],
               slurm_env(env, SRUN_EXIT="99", JOB_STATE=job_state, RESTARTS=restarts))
    summary = (tmp_path / "run dir" / "logs" / "summary.txt").read_text()
    assert f" train 7 {outcome} log: {tmp_path / 'run dir' / 'logs' / 'train-7.out'}" in summary, done.stdout
    assert "rendezvous: node1:20007, 2 tasks on 2 node(s), restart 0" in done.stdout
    requeued = "requeue 7" in (log / "scontrol").read_text()
    assert requeued == (outcome == "requeued (exit 99)")
    assert "FAILED" not in summary


@pytest.mark.parametrize("restart_count, requeued", [("0", True), ("3", False)])
def test_a_hung_training_is_requeued_until_it_has_hung_three_times(tmp_path, fake_slurm, restart_count, requeued):
    # 98: train.watchdog's exit after no update for heal.watchdog_minutes (stacks in the log).
    env, log = fake_slurm
    p = pipeline(tmp_path)
    done = run(["bash", STAGE, "train", str(p)],
               slurm_env(env, SRUN_EXIT="98", JOB_STATE="RUNNING", RESTARTS=restart_count,
                         SLURM_RESTART_COUNT=restart_count))
    summary = (tmp_path / "run dir" / "logs" / "summary.txt").read_text()
    assert ("requeue 7" in (log / "scontrol").read_text()) == requeued
    if requeued:
        assert " train 7 requeued (exit 98) " in summary, done.stdout
    else:
        assert done.returncode == 1
        assert "hung again" in done.stderr and "after 3 requeues" in done.stderr
        assert " train 7 FAILED (exit 1) " in summary


def test_the_eval_watcher_stops_when_training_ends_without_success(tmp_path, fake_slurm):
    env, log = fake_slurm
    p = pipeline(tmp_path)
    done = run(["bash", STAGE, "eval_watch", str(p)], slurm_env(env, TRAIN_JOB_ID="5", JOB_STATE="FAILED"))
    assert done.returncode == 1
    assert "error: training job 5 ended FAILED: no final checkpoint to wait for" in done.stderr
    assert "show job -o 5" in (log / "scontrol").read_text()
    assert " eval_watch 7 FAILED (exit 1) " in (tmp_path / "run dir" / "logs" / "summary.txt").read_text()


def test_the_job_state_reader():
    line = "JobId=12 JobName=train UserId=u(0) JobState=COMPLETING Reason=None Restarts=2 Command=/a b/c.sh"
    assert jobs.parse_show_job(line + "\n") == {"JobId": "12", "JobName": "train", "UserId": "u(0)",
                                                "JobState": "COMPLETING", "Reason": "None", "Restarts": "2",
                                                "Command": "/a"}
    assert jobs.parse_show_job("") == {}
    assert "COMPLETING" in jobs.ACTIVE and "FAILED" in jobs.UNSUCCESSFUL and not jobs.ACTIVE & jobs.UNSUCCESSFUL


# ---- --local ----------------------------------------------------------------------------------------------------

def test_a_second_local_run_keeps_the_first_ones_log(tmp_path, fake_slurm):
    env, _ = fake_slurm
    (tmp_path / "in put").mkdir()
    (tmp_path / "in put" / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    p = pipeline(tmp_path, SITE=None, PREP_TASKS=1)
    (tmp_path / "in put" / "docs.jsonl").unlink()
    for _ in range(2):
        done = run([SUBMIT, str(p), "--local"], env)
        assert done.returncode == 1, done.stdout + done.stderr
    text = (tmp_path / "run dir" / "logs" / "prep_tokenize-local.out").read_text()
    assert text.count(f"==== submit.sh --local {p} at ") == 2
    assert text.count("malformed JSON") == 2 and text.index("malformed JSON") < text.rindex("==== submit.sh")


def test_the_site_environment_setup_runs_once_before_the_checks(tmp_path, fake_slurm):
    env, _ = fake_slurm
    site = site_file(tmp_path, "setup site.env", SITE_ENV_SETUP="echo setup ran >&2; export FROM_SETUP=1")
    done = run([SUBMIT, str(pipeline(tmp_path, SITE=site)), "--dry-run"], env)
    assert done.returncode == 0 and done.stderr == "setup ran\n", done.stderr
    site = site_file(tmp_path, "failing site.env", SITE_ENV_SETUP="false")
    done = run([SUBMIT, str(pipeline(tmp_path, SITE=site)), "--dry-run"], env)
    assert done.returncode == 1 and done.stderr == "error: SITE_ENV_SETUP failed: false\n", done.stderr
