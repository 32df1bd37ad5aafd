"""The training step as a GPU would run it, checked on CPU with a real DeepSpeed engine (ZeRO-1, gloo, 1 rank):
the process group's timeout, host syncs per update, compiled graphs. Each case runs in its own process, as train
does, so process groups and compiled graphs never leak between tests."""
import json
import subprocess
import textwrap

from tests.conftest import PYTHON, REPO

SHAPE = ["batch.seq_len=32", "batch.micro_batch=2", "batch.total_tokens=128", "eval.every=0", "sample.every=0",
         "checkpoint.every=0", "log.tensorboard=false"]


def probe(code: str, run_dir, dataset, *sets: str, timeout: int = 300) -> dict:
    """Run `code` with `trainer` (a train.trainer.Trainer of the tiny recipe and `sets`) in a fresh process; the
    code prints one JSON line last, returned here."""
    script = textwrap.dedent("""
        import json, sys
        import torch
        import torch.distributed as dist
        from train.recipe import load
        from train.trainer import Trainer
        trainer = Trainer(load(sys.argv[1], sys.argv[2:]))
    """) + textwrap.dedent(code)
    args = [f"run_dir={run_dir}", f"data.dir={dataset}", *SHAPE, *sets]
    result = subprocess.run([PYTHON, "-c", script, str(REPO / "configs/train/tiny-cpu.yaml"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_process_group_waits_as_long_as_the_recipe_says(tiny_dataset, tmp_path):
    # DeepSpeed 0.19.8 would give 10 minutes; the recipe's key (default 60) reaches the group the engine uses.
    code = """
        trainer.build()
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        print(json.dumps({"minutes": backend.options._timeout.total_seconds() / 60}))
    """
    from train.recipe import load
    assert load(REPO / "configs/train/tiny-cpu.yaml").dist_timeout_minutes == 60
    assert probe(code, tmp_path, tiny_dataset, "schedule.max_steps=1", "dist_timeout_minutes=45") == {"minutes": 45}
