"""Running lm-eval tasks: our offline HellaSwag definition, any built-in task by name, results as plain dicts."""
from __future__ import annotations

import logging
from pathlib import Path

from common import hellaswag
from common.errors import PipelineError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
HELLASWAG_YAML = TASKS_DIR / "hellaswag_local.yaml"
# What the pipeline reads when no --hellaswag-file is given (written there by `python -m prep eval-data`).
DEFAULT_HELLASWAG = Path("data/eval/hellaswag_val.jsonl")


class EvalError(PipelineError):
    """Bad input to an evaluation (task, data file, checkpoint); the message names the problem."""


def lm_eval_version() -> str:
    from importlib.metadata import version
    return version("lm_eval")


def check_hellaswag_file(path: Path) -> int:
    """Every line a HellaSwag doc (common.hellaswag, the check prep eval-data runs); returns the number of docs."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"HellaSwag file {path} not found (write it with `python -m prep eval-data --out DIR` "
                        "on a machine with internet, or pass --hellaswag-file)")
    return hellaswag.check_file(path)


def hellaswag_config(path: Path) -> dict:
    """Our task YAML (parsed by lm-eval itself, so !function resolves as lm-eval does) pointed at `path`."""
    from lm_eval.tasks._yaml_loader import load_yaml
    config = load_yaml(HELLASWAG_YAML)
    config["dataset_kwargs"] = {"data_files": {"validation": str(Path(path).resolve())}}
    return config


def load_tasks(names: list[str], hellaswag_file: Path | None = None) -> dict:
    """Task objects by the names asked for; `hellaswag` is the offline local definition."""
    from lm_eval.tasks import TaskManager
    if not names:
        raise EvalError("no tasks given")
    hellaswag_path = Path(hellaswag_file) if hellaswag_file else DEFAULT_HELLASWAG
    if "hellaswag" in names:
        check_hellaswag_file(hellaswag_path)  # first: a bad file fails in a second, before lm-eval loads anything
    builtin = [n for n in names if n != "hellaswag"]
    # Indexing lm-eval's thousands of built-in task YAMLs takes tens of seconds: only when one is asked for.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(builtin))
    unknown = [n for n in builtin if n not in manager.all_tasks]
    if unknown:
        raise EvalError(f"lm-eval {lm_eval_version()} has no task {', '.join(map(repr, unknown))} "
                        "(`lm_eval ls tasks` lists them)")
    tasks = {}
    if "hellaswag" in names:
        tasks["hellaswag"] = manager.load([hellaswag_config(hellaswag_path)])["tasks"]["hellaswag_local"]
    for name in builtin:
        try:
            loaded = manager.load([name])["tasks"]
        except Exception as exc:  # datasets/hub errors of many kinds, e.g. no network on a compute node
            raise EvalError(f"cannot load lm-eval task {name!r}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        for task_name, task in loaded.items():
            tasks[task_name] = task
    return tasks


def run_tasks(lm, tasks: dict, limit: int | None = None, log_samples: bool = False) -> dict:
    """Evaluate `lm` (an lm-eval LM) 0-shot on `tasks` ({name: Task}); lm-eval's raw output dict.

    lm-eval's `evaluate`, given the task objects as `simple_evaluate` would hand them to it (0-shot where the task
    sets no num_fewshot). Not `simple_evaluate` itself: after scoring it collects an environment report (pip list,
    nvidia-smi, git describe: about 0.7 s here, more on a GPU node), paid by every per-checkpoint eval job and
    recorded nowhere by us. tests/test_eval.py compares the two entry points' results on the same docs.
    """
    if "hellaswag" in tasks:  # before scoring: an ending longer than the model's context (common.hellaswag)
        hellaswag.check_fits(tasks["hellaswag"].config.dataset_kwargs["data_files"]["validation"], lm.max_length,
                             limit)
    from lm_eval.defaults import DEFAULT_OTHER_SEED
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # The tasks are already loaded: a manager of our own, so that nothing indexes lm-eval's thousands of
    # built-in task YAMLs (about 15 s per call).
    loaded = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(list(tasks.values()))
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)  # simple_evaluate's default: the same few-shot examples
    return evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=log_samples)


def summarize(raw: dict, tasks: dict) -> dict:
    """{our name: {task_version, n_docs, acc, acc_stderr, ...}} from lm-eval's output, metrics as plain floats."""
    summary = {}
    for ours, task in tasks.items():
        name = task.task_name
        metrics = {}
        for key, value in raw["results"][name].items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            metrics[metric if filt == "none" else f"{metric},{filt}"] = float(value)
        summary[ours] = {"lm_eval_task": name, "task_version": raw["versions"].get(name),
                         "n_docs": int(raw["n-samples"][name]["effective"]), **metrics}
    return summary
