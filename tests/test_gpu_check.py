"""bench/gpu_check.sh and the GPU benches it runs, as far as they run without a GPU."""
import json
import os
import subprocess

from tests.conftest import PYTHON, REPO
from tests.fixtures_run import free_port

ENGINE_PROBE = """
import json, torch
from bench.bench_plan_memory import trainer_engine
from train import optim
engine, optimizer = trainer_engine("tiny", 2, 64, "configs/deepspeed/zero1.json", "cpu")
print(json.dumps({
                  "optimizer_section": "optimizer" in engine.config,
                  "optimizer": type(optimizer).__module__ + "." + type(optimizer).__name__,
                  "wrapped": engine.optimizer.optimizer is optimizer,
                  "lrs": [g["lr"] for g in optimizer.param_groups]}))
"""


def test_plan_memory_measures_the_trainers_engine_and_optimizer():
    """bench_plan_memory --device cuda builds its engine with train.recipe/train.optim, as Trainer.build does: no
    optimizer section in the DeepSpeed config (DeepSpeed would JIT-build FusedAdam with nvcc), torch's AdamW (fused
    on CUDA) inside the engine. The same function, on CPU with gloo."""
    proc = subprocess.run([PYTHON, "-c", ENGINE_PROBE], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["optimizer_section"] is False
    assert probe["optimizer"] == "torch.optim.adamw.AdamW"
    assert probe["wrapped"] is True
    assert probe["lrs"] == [6e-4, 6e-4]  # the recipe's peak lr, as set_lr gives it before an update


def test_gpu_check_usage_error():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "bogus"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: bench/gpu_check.sh [prepare|dry-run]" in proc.stderr
