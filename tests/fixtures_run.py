"""Training runs made by the real `python -m train` on tiny_dataset, for train/eval/slurm tests."""
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import PYTHON, REPO

__all__ = ["tiny_run", "train_command", "run_train", "read_metrics", "sigkill_after_step", "free_port"]

# Shapes small enough that one optimizer step takes about a second on a busy 2-core CPU; ZeRO-1, the GPU recipes'
# stage (the tiny recipe's own is ZeRO-0), so that runs exercise a partitioned optimizer and universal checkpoints.
FAST = ["deepspeed=configs/deepspeed/zero1.json", "schedule.max_steps=6", "optim.warmup_steps=3", "batch.seq_len=32", "batch.micro_batch=2", "batch.total_tokens=128",
        "eval.every=3", "eval.val_batches=2", "checkpoint.every=3", "checkpoint.keep_last=3",
        "sample.every=3", "sample.max_new_tokens=8", "log.tensorboard=true"]


_port_draws = itertools.count()


def free_port() -> int:
    """A port for one run's rendezvous (torchrun's --master_port), free now. Each pytest-xdist worker hands out
    ports from its own range of 1,000, so two workers never give their tests the same one. The ranges lie above the
    ports the test Slurm cluster's jobs take (20000 + job id, train/launch.py) and below the kernel's ephemeral
    ports (32768 and up), where bind-to-port-0 and every outgoing connection take theirs."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...; unset without xdist
    base = 24000 + 1000 * (int(worker[2:]) + 1 if worker.startswith("gw") else 0)
    for _ in range(1000):
        port = base + next(_port_draws) % 1000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use, or not yet released by a run that just ended
                continue
        return port
    raise RuntimeError(f"no free port in {base}-{base + 999}")


def train_command(run_dir, dataset, *overrides, nproc: int = 1, port: int | None = None,
                  launcher: str = "torchrun", module: str = "train") -> list[str]:
    """`python -m train` alone (nproc 1), or with nproc CPU ranks (gloo) under torchrun or the deepspeed launcher;
    module names a wrapper of train's CLI instead (tests.live_fp32_train)."""
    sets = [f"run_dir={run_dir}", f"data.dir={dataset}", *FAST, *overrides]
    args = ["-m", module, "--config", str(REPO / "configs/train/tiny-cpu.yaml")]
    for s in sets:
        args += ["--set", s]
    if nproc == 1:
        return [PYTHON, *args]
    if launcher == "deepspeed":
        # On CPU the deepspeed launcher counts "devices" from LOCAL_SIZE; `env` makes the command self-contained.
        return ["env", f"LOCAL_SIZE={nproc}", str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", str(nproc),
                "--master_port", str(port or free_port()), "--module", *args[1:]]
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(port or free_port()), *args]


def run_train(cmd, check_rc: int | None = 0, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check_rc is not None and result.returncode != check_rc:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-6000:])
        raise AssertionError(f"train exited {result.returncode}, expected {check_rc}: {' '.join(map(str, cmd))}")
    return result


def sigkill_after_step(cmd, run_dir: Path, step: int, timeout: float = 240) -> int:
    """Start a training command, SIGKILL every process of it once metrics.jsonl logs `step` (no chance to
    save), and return the step of the checkpoint `latest` names then."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and f'"step": {step}, "loss"' in metrics.read_text():
            break
        time.sleep(0.05)
    # torchrun puts each rank in its own session: kill the ranks themselves, then torchrun.
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return int((Path(run_dir) / "checkpoints/latest").read_text().strip().removeprefix("global_step"))


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, validation lines) of RUN/metrics.jsonl."""
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_loss" in r]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_dataset) -> Path:
    """A finished 6-step single-process run of configs/train/tiny-cpu.yaml: checkpoints at steps 3 and 6,
    metrics.jsonl with train and val lines, samples.jsonl, TensorBoard events."""
    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    run_train(train_command(run_dir, tiny_dataset))
    return run_dir
