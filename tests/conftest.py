"""Shared test setup: the read-only inputs in ../shared, offline mode, and stage fixtures."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PIPELINE_SHARED", REPO.parent / "shared")).resolve()
PYTHON = sys.executable


def pytest_configure(config):
    missing = [p for p in ("tiktoken", "data/tinyshakespeare.txt", "data/hellaswag_val.jsonl")
               if not (SHARED / p).exists()]
    if missing:
        raise pytest.UsageError(
            f"test inputs missing under {SHARED}: {', '.join(missing)} "
            "(check out ../shared beside the project, or set PIPELINE_SHARED)")
    # Tests never touch the network: tokenizer from the shared cache, Hub libraries offline.
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# `pytest -m "not slow"`: the fast subset (minutes on 2 cores). Slow: a module that trains, scores with lm-eval or
# runs a pipeline in most of its tests, and single tests that need a trained run. `slurm`: needs root and starts a
# real Slurm cluster (slurm-wlm and munge installed: .ci/run does it).
SLOW_MODULES = {"test_slurm_cluster", "test_pipeline_local", "test_train_distributed", "test_train_run",
                "test_checkpoint_faults", "test_checkpoint_load", "test_eval_watch", "test_eval", "test_eval_dtype",
                "test_hf", "test_muon", "test_train_mix", "test_export", "test_recipe_resume", "test_optim_startup",
                "test_train_step", "test_train_val_split", "test_train_bad_input", "test_prep_resume",
                "test_gpu_check", "test_train_metrics", "test_train_heal", "test_eval_lineage",
                "test_train_watchdog", "test_train_writer", "test_train_summary",
                "test_wandb_log", "test_warm_start", "test_train_paths"}
SLOW_TESTS = {"test_a_run_dir_with_another_recipe_is_refused_before_anything_is_submitted",
              "test_python_blocks_run", "test_shell_commands",
              "test_every_update_logs_its_data_wait_to_metrics_and_tensorboard",
              "test_train_stops_before_the_bad_batch_reaches_the_model"}
SLURM_MODULES = {"test_slurm_cluster"}


def module_name(module) -> str:
    return module.__name__.rpartition(".")[2]


def slow_modules(items) -> set[str]:
    return {module_name(item.module) for item in items if item.get_closest_marker("slow")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = module_name(item.module)
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if module in SLURM_MODULES:
            item.add_marker(pytest.mark.slurm)
    if "PYTEST_XDIST_WORKER" in os.environ:
        # Workers take modules in this order (the Makefile turns off xdist's own reordering): the Slurm modules
        # first, which run alone except beside modules without a slow test (slurm_modules_run_alone), so those come
        # next, to fill the other worker meanwhile; then the rest. Every worker sorts alike, as xdist requires.
        slow = slow_modules(items)
        items.sort(key=lambda item: 0 if module_name(item.module) in SLURM_MODULES
                   else 1 if module_name(item.module) not in slow else 2)  # stable: a module's tests keep their order


@pytest.fixture(scope="module", autouse=True)
def slurm_modules_run_alone(request, tmp_path_factory):
    """Under pytest-xdist (`make test` runs 2 workers, whole modules each), a Slurm module waits for the other
    worker's module with slow tests to end and holds off the next until it ends itself: its jobs wait on timeouts
    that a training run on the other worker stretched past their limits. Modules without a slow test run beside it.
    A readers-writer lock of two flocks in the workers' shared temp directory: a writer first takes the turnstile,
    so readers arriving meanwhile wait rather than starve it."""
    module = module_name(request.module)
    if "PYTEST_XDIST_WORKER" not in os.environ or module not in slow_modules(request.session.items):
        yield
        return
    import fcntl
    shared = tmp_path_factory.getbasetemp().parent
    alone = module in SLURM_MODULES
    with open(shared / "turnstile.lock", "a") as turnstile, open(shared / "modules.lock", "a") as modules:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(modules, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# Fixtures that build real artefacts with the stages themselves, shared across test modules.
from tests.fixtures_data import *  # noqa: E402,F401,F403
from tests.fixtures_run import *  # noqa: E402,F401,F403
