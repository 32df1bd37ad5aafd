"""slurm/submit.sh without Slurm: --local runs the same stages in order here (what `make demo` does), --dry-run
shows the chain, and bad input is refused before anything runs. Paths contain spaces."""
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest

from common import yamlfile
from tests.conftest import PYTHON, REPO, SHARED
from tests.slurm_cluster import split_inputs, write_env_file

SUBMIT = str(REPO / "slurm" / "submit.sh")


def submit(pipeline, *flags):
    return subprocess.run([SUBMIT, str(pipeline), *flags], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=PYTHON))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("local") / "demo dir"
    root.mkdir()
    split_inputs(REPO, SHARED / "data" / "tinyshakespeare.txt", root / "input docs", files=2)
    return root


def pipeline_file(root, name, **extra):
    values = {
        "SITE": "", "PREP_SOURCE": "local", "PREP_INPUT": root / "input docs", "RAW_DIR": root / "input docs",
        "DATASET_DIR": root / "data set", "PREP_TASKS": 2, "PREP_SHARD_TOKENS": 100000, "PREP_VAL_TOKENS": 20000,
        "TRAIN_RECIPE": REPO / "configs" / "train" / "tiny-cpu.yaml",
        "TRAIN_OVERRIDES": ["schedule.max_steps=4", "optim.warmup_steps=1", "checkpoint.every=2",
                            "eval.every=2", "eval.val_batches=2", "sample.every=0"],
        "RUN_DIR": root / "tiny run", "NODES": 1, "GPUS_PER_NODE": 1,
        "HELLASWAG": SHARED / "data" / "hellaswag_val.jsonl", "EVAL_LIMIT": 5, "EVAL_POLL": 1,
    }
    values.update(extra)
    return write_env_file(root / f"{name}.env", {k: v for k, v in values.items() if v is not None})  # None: unset


@pytest.fixture(scope="module")
def local_run(workdir):
    done = submit(pipeline_file(workdir, "tiny"), "--local")
    return workdir, done


def test_local_pipeline_goes_from_text_to_report(local_run):
    root, done = local_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = root / "tiny run"
    assert "stages: prep_tokenize prep_finalize train eval_watch" in done.stdout
    assert done.stdout.rstrip().splitlines()[-1] == f"report: {run}/eval/report.md"
    assert re.search(r"^stage +time\n(\w+ +\d+m \d\ds\n){4}pipeline finished", done.stdout, re.M), done.stdout[-800:]
    assert (run / "eval" / "report.md").exists()
    verify = subprocess.run([PYTHON, "-m", "prep", "verify", str(root / "data set")], cwd=REPO,
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    scored = sorted(json.loads(line)["tag"] for line in (run / "eval" / "results.jsonl").read_text().splitlines())
    assert scored == ["global_step2", "global_step4"]
    summary = (run / "logs" / "summary.txt").read_text().splitlines()
    assert [line.split()[1:4] for line in summary] == [
        ["prep_tokenize", "local-0", "ok"], ["prep_tokenize", "local-1", "ok"], ["prep_finalize", "local", "ok"],
        ["train", "local", "ok"], ["eval_watch", "local", "ok"]]
    assert all(re.search(r"log: .* \(\d+m \d\ds\)$", line) for line in summary), summary  # each stage's time
    assert "tokenize task 1/2" in (run / "logs" / "prep_tokenize-local.out").read_text()


def test_one_checkpoint_script_runs_without_slurm(local_run):
    root, _ = local_run
    ckpt = root / "tiny run" / "checkpoints" / "global_step2"
    done = subprocess.run(["bash", str(REPO / "slurm" / "stage.sbatch"), "eval", str(root / "tiny.env"), str(ckpt)],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHON=PYTHON))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((root / "tiny run" / "eval" / "global_step2.json").read_text())["tag"] == "global_step2"


def test_dry_run_after_prep_reuses_the_dataset(local_run):
    root, _ = local_run
    done = submit(root / "tiny.env", "--local", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "reusing dataset" in done.stdout and "stages: train eval_watch" in done.stdout
    assert "stage.sbatch prep_tokenize" not in done.stdout


def test_slurm_dry_run_prints_the_chain_and_submits_nothing(workdir):
    site = write_env_file(workdir / "site.env", {"SITE_PARTITION": "gpu", "SITE_ACCOUNT": "proj1", "SITE_QOS": "",
                                                 "SITE_GPUS_PER_NODE": 8, "SITE_CPUS_PER_NODE": 64,
                                                 "SITE_SIGNAL_SECONDS": 300, "SITE_TIME_TRAIN": "12:00:00"})
    pipeline = pipeline_file(workdir, "multi", SITE=site, NODES=2, GPUS_PER_NODE=2, DATASET_DIR=workdir / "new data",
                             RUN_DIR=workdir / "multi run",
                             TRAIN_OVERRIDES=["batch.total_tokens=512"])
    done = submit(pipeline, "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 4
    tokenize, finalize, train, watch = lines
    assert "--array=0-1" in tokenize and "stage.sbatch prep_tokenize " in tokenize
    assert "--dependency=afterok:\\<prep_tokenize\\>" in finalize
    for flag in ("--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=32", "--gpus-per-node=gpu:2",
                 "--signal=USR1@300", "--requeue", "--open-mode=append", "--time=12:00:00",
                 "--partition=gpu", "--account=proj1", "--dependency=afterok:\\<prep_finalize\\>"):
        assert flag in train.split(), flag
    assert "after:\\<train\\>" in watch and "TRAIN_JOB_ID=\\<train\\>" in watch
    assert "demo\\ dir" in train                      # paths are quoted for pasting into a shell
    assert not (workdir / "multi run").exists()


@pytest.mark.parametrize("mode", ["jobs", "watch"])
def test_eval_mode_decides_who_holds_the_eval_gpu(workdir, mode):
    """jobs (the default): the watcher asks for 1 CPU and no GPU, and each checkpoint's eval job for one GPU with
    its own time limit; watch: the watcher holds the GPU for as long as training runs."""
    site = write_env_file(workdir / "gpu site.env", {"SITE_GPUS_PER_NODE": 8, "SITE_CPUS_PER_NODE": 64,
                                                     "SITE_EVAL_CPUS": 8, "SITE_SIGNAL_SECONDS": 300,
                                                     "SITE_TIME_EVAL_JOB": "00:30:00"})
    pipeline = pipeline_file(workdir, f"mode {mode}", SITE=site, RUN_DIR=workdir / f"{mode} run",
                             DATASET_DIR=workdir / "new data", EVAL_MODE=None if mode == "jobs" else mode)
    done = submit(pipeline, "--dry-run")
    assert done.returncode == 0, done.stderr
    watch = next(line.split() for line in done.stdout.splitlines() if "stage.sbatch eval_watch " in line)
    eval_jobs = [line for line in done.stdout.splitlines() if line.startswith("eval jobs ")]
    assert re.search(rf"^eval mode +{mode}", done.stdout, re.M), done.stdout
    if mode == "jobs":
        assert "--cpus-per-task=1" in watch and not any(w.startswith("--gpus") for w in watch), watch
        [line] = eval_jobs   # shell words, as the watcher's --submit splits them (paths with spaces stay whole)
        words = shlex.split(line.split(": ", 1)[1])
        assert words[0] == "sbatch"
        assert words[-4:] == [str(REPO / "slurm" / "stage.sbatch"), "eval", str(pipeline), "TAG"]
        assert {"--job-name=eval", "--gpus-per-node=gpu:1", "--cpus-per-task=8", "--time=00:30:00"} <= set(words)
    else:
        assert {"--cpus-per-task=8", "--gpus-per-node=gpu:1"} <= set(watch) and not eval_jobs
    assert not (workdir / f"{mode} run").exists()


def test_an_unknown_eval_mode_is_refused(workdir):
    pipeline = pipeline_file(workdir, "bad mode", EVAL_MODE="sometimes", RUN_DIR=workdir / "bad mode run")
    done = submit(pipeline, "--local")
    line = next(i for i, text in enumerate(pipeline.read_text().splitlines(), 1) if text.startswith("EVAL_MODE="))
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"error: {pipeline} line {line}: EVAL_MODE must be jobs"), done.stderr
    assert not (workdir / "bad mode run").exists()


@pytest.mark.parametrize("problem", ["missing site file", "recipe fails validation", "GPUs do not divide batch",
                                     "missing input"])
def test_bad_input_is_refused_before_any_stage(workdir, problem):
    extra = {"missing site file": {"SITE": workdir / "nowhere.env"},
             "recipe fails validation": {"TRAIN_OVERRIDES": "optim.no_such_key=1"},
             "GPUs do not divide batch": {"GPUS_PER_NODE": 3},
             "missing input": {"PREP_INPUT": workdir / "no such dir"}}[problem]
    flags = [] if problem == "missing site file" else ["--local"]
    done = submit(pipeline_file(workdir, "bad", RUN_DIR=workdir / "bad run", DATASET_DIR=workdir / "bad data",
                                **extra), *flags)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (workdir / "bad run").exists() and not (workdir / "bad data").exists()


def test_failed_stage_names_itself_and_its_log(workdir):
    bad = workdir / "broken input"
    bad.mkdir()
    (bad / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    done = submit(pipeline_file(workdir, "broken", PREP_INPUT=bad, PREP_TASKS=1, RUN_DIR=workdir / "broken run",
                                DATASET_DIR=workdir / "broken data"), "--local")
    assert done.returncode == 1
    log = workdir / "broken run" / "logs" / "prep_tokenize-local.out"
    assert f"error: stage prep_tokenize failed (exit 1); log: {log}" in done.stderr
    assert "not run: prep_finalize train eval_watch" in done.stderr
    assert "malformed JSON" in log.read_text()
    assert not (workdir / "broken run" / "checkpoints").exists()


@pytest.mark.parametrize("script", ["prep_download", "prep_tokenize", "prep_finalize", "train", "eval_watch", "eval"])
def test_a_job_whose_site_file_is_gone_fails_naming_it(workdir, script):
    """submit.sh checked the site file, but it was removed before the job started: each stage stops with the path
    named instead of running without the partition, environment setup and network settings."""
    site = workdir / "site gone.env"
    site.write_text("SITE_ENV_SETUP='echo site setup ran'\n")
    pipeline = pipeline_file(workdir, f"gone-{script}", SITE=site, PREP_SOURCE="fineweb-edu",
                             RAW_DIR=workdir / f"gone raw {script}", DATASET_DIR=workdir / f"gone data {script}",
                             RUN_DIR=workdir / f"gone run {script}")
    site.unlink()
    done = subprocess.run(["bash", str(REPO / "slurm" / "stage.sbatch"), script, str(pipeline)], cwd=REPO,
                          capture_output=True, text=True, env=dict(os.environ, PYTHON=PYTHON))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.splitlines() == [f"error: site file not found: {site} (named by SITE= in {pipeline}; "
                                        "copy slurm/site.env.example there and edit it)"]
    assert not any((workdir / f"gone {what} {script}").exists() for what in ("raw", "data", "run"))


def test_a_local_source_needs_no_raw_dir_and_a_hub_source_does(workdir):
    local = pipeline_file(workdir, "no-raw", RAW_DIR=None, DATASET_DIR=workdir / "no-raw data",
                          RUN_DIR=workdir / "no-raw run")
    done = submit(local, "--local", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "stages: prep_tokenize prep_finalize train eval_watch" in done.stdout
    hub = pipeline_file(workdir, "hub-no-raw", RAW_DIR=None, PREP_SOURCE="fineweb-edu", PREP_INPUT=None,
                        DATASET_DIR=workdir / "hub data", RUN_DIR=workdir / "hub run")
    done = submit(hub, "--local", "--dry-run")
    assert done.returncode == 1
    assert done.stderr == f"error: {hub} does not set RAW_DIR (needed with PREP_SOURCE=fineweb-edu)\n"
    no_input = pipeline_file(workdir, "no-input", RAW_DIR=None, PREP_INPUT=None, DATASET_DIR=workdir / "ni data",
                             RUN_DIR=workdir / "ni run")
    done = submit(no_input, "--local", "--dry-run")
    assert done.returncode == 1
    assert done.stderr == "error: PREP_SOURCE=local needs PREP_INPUT (files or directories)\n"


# ---- TRAIN_MIX: training on a mixture of the pipeline's dataset and datasets prepared before ------------------

def mix_entry(path, weight, name=None):
    return f"{path}={weight}" + (f"={name}" if name else "")


@pytest.fixture(scope="module")
def dictionary_docs(workdir):
    """GCIDE dictionary entries as jsonl documents: the text the mix pipeline prepares (not Shakespeare, so its
    val loss differs from tiny_dataset's)."""
    with open(SHARED / "data" / "gcide.txt", encoding="utf-8", errors="replace") as f:
        f.seek(2_000_000)
        text = f.read(300_000)
    (workdir / "gcide.txt").write_text(text, encoding="utf-8")
    return split_inputs(REPO, workdir / "gcide.txt", workdir / "dictionary docs", files=1)


def mix_pipeline(workdir, name, mix, **extra):
    return pipeline_file(workdir, name, PREP_TASKS=1, TRAIN_MIX=mix, RUN_DIR=workdir / f"{name} run", **extra)


def test_a_local_pipeline_trains_on_its_dataset_mixed_with_one_prepared_before(workdir, dictionary_docs,
                                                                             tiny_dataset):
    # The pipeline's own dataset has a space, a quote, a comma and brackets in its path, so the flow list train
    # reads as data.mix must quote it; its entry names it (its directory name is no metrics name).
    own = workdir / "it's the [dictionary], mixed"
    pipeline = mix_pipeline(workdir, "mix", [mix_entry(own, 0.7, "dict"), mix_entry(tiny_dataset, 0.3)],
                            DATASET_DIR=own, PREP_INPUT=dictionary_docs,
                            TRAIN_OVERRIDES=["schedule.max_steps=4", "optim.warmup_steps=1", "checkpoint.every=4",
                                             "eval.every=2", "eval.val_batches=2", "sample.every=0"])
    done = submit(pipeline, "--local")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stages: prep_tokenize prep_finalize train eval_watch" in done.stdout   # it prepared its own dataset
    run = workdir / "mix run"
    assert yamlfile.load(run / "config.yaml")["data"] == {"dir": None, "mix": [{"dir": str(own), "weight": 0.7, "name": "dict"},
                                          {"dir": str(tiny_dataset), "weight": 0.3, "name": None}]}
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [r["step"] for r in val] == [2, 4]
    for r in val:
        assert r["val_loss"] == pytest.approx(0.7 * r["val_loss/dict"] + 0.3 * r["val_loss/ds"], rel=1e-12)
        assert r["val_loss/dict"] != r["val_loss/ds"]
    train_log = (run / "logs" / "train-local.out").read_text()
    assert "data dict" in train_log and "share 0.7" in train_log and "data ds" in train_log
    assert (run / "eval" / "report.md").exists()


@pytest.mark.parametrize("problem", ["no weight", "weight 0", "weight not a number", "not prepared",
                                     "DATASET_DIR not listed", "tokenizers differ", "not prep's tokenizer"])
def test_a_bad_train_mix_is_refused_in_one_line_before_anything_runs(workdir, tiny_dataset, problem):
    own = workdir / "mix-data"
    missing = workdir / "never prepared"
    other = workdir / "other-tokenizer"
    if problem in ("tokenizers differ", "not prep's tokenizer") and not other.exists():
        shutil.copytree(tiny_dataset, other)
        manifest = json.loads((other / "manifest.json").read_text())
        manifest["tokenizer"] = {**manifest["tokenizer"], "name": "r50k_base"}
        (other / "manifest.json").write_text(json.dumps(manifest))
    good = [mix_entry(own, 0.7), mix_entry(tiny_dataset, 0.3)]
    mix, expected = {
        "no weight": ([str(own), good[1]], f"TRAIN_MIX[0] '{own}' is not DIR=WEIGHT or DIR=WEIGHT=NAME"),
        "weight 0": ([good[0], mix_entry(tiny_dataset, 0)],
                     f"TRAIN_MIX[1] '{tiny_dataset}=0' is not DIR=WEIGHT or DIR=WEIGHT=NAME"),
        "weight not a number": ([mix_entry(own, "0.7x"), good[1]],
                                f"TRAIN_MIX[0] '{own}=0.7x' is not DIR=WEIGHT or DIR=WEIGHT=NAME"),
        "not prepared": ([*good, mix_entry(missing, 1)],
                         f"TRAIN_MIX: {missing} is not a finished dataset (no manifest.json); this pipeline "
                         f"prepares only DATASET_DIR, so prepare {missing} first"),
        "DATASET_DIR not listed": ([good[1], mix_entry(missing, 0.5)],
                                   f"TRAIN_MIX does not list DATASET_DIR ({own}), the dataset this pipeline prepares"),
        # own is not prepared yet: the two datasets that are must still agree, as train will require.
        "tokenizers differ": ([*good, mix_entry(other, 0.2)],
                              f"recipe {REPO / 'configs/train/tiny-cpu.yaml'} fails for 1 node(s) x 1 process(es): "
                              f"data.mix: the datasets were tokenized differently: {tiny_dataset} has gpt2"),
        # own, still to be prepared, will have prep's gpt2: the one prepared dataset must have it too.
        "not prep's tokenizer": ([mix_entry(own, 0.7), mix_entry(other, 0.3)],
                                 f"recipe {REPO / 'configs/train/tiny-cpu.yaml'} fails for 1 node(s) x 1 process(es): "
                                 f"data.mix: the datasets would be tokenized differently: {other} has r50k_base "
                                 f"(n_vocab 50257, eot 50256), {own} is still to be prepared, by prep with gpt2"),
    }[problem]
    pipeline = mix_pipeline(workdir, "bad mix", mix, DATASET_DIR=own)
    done = submit(pipeline, "--local", "--dry-run")
    assert done.returncode == 1, done.stdout + done.stderr
    if problem in ("no weight", "weight 0", "weight not a number"):   # a value of the file: its line is named
        line = next(i for i, x in enumerate(pipeline.read_text().splitlines(), 1) if x.startswith("TRAIN_MIX="))
        expected = f"{pipeline} line {line}: {expected}"
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(f"error: {expected}"), done.stderr
    assert not (workdir / "bad mix run").exists() and not own.exists() and not missing.exists()


def test_train_mix_paths_with_spaces_quotes_and_equals_signs_reach_the_recipe_whole(workdir, tiny_dataset):
    """A prepared dataset at a path holding a space, a quote, '=', ',', '#' and brackets: the recipe check (the
    trainer's own loader, which opens each prepared dataset of a mix) finds it, and train's data.mix names it."""
    odd = workdir / "it's = a, [set] #1"
    if not odd.exists():
        shutil.copytree(tiny_dataset, odd)
    own = workdir / "mix-data"
    done = submit(mix_pipeline(workdir, "odd mix", [mix_entry(own, 7), mix_entry(odd, 2, "odd"),
                                                    mix_entry(tiny_dataset, 1)], DATASET_DIR=own),
                  "--local", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "recipe ok:" in done.stdout and "stages: prep_tokenize prep_finalize train eval_watch" in done.stdout
    shown = next(line for line in done.stdout.splitlines() if line.startswith("train data"))
    assert yamlfile.parse(shown.split(None, 2)[2]) == [{"dir": str(own), "weight": 7},
                                               {"dir": str(odd), "weight": 2, "name": "odd"},
                                               {"dir": str(tiny_dataset), "weight": 1}]
    assert not own.exists() and not (workdir / "odd mix run").exists()
