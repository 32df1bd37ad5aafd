"""Who am I in the job: rank, local rank, world size, rendezvous address, device and backend.

torchrun and the deepspeed launcher set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT themselves.
Under srun (one task per GPU) they come from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS; MASTER_ADDR defaults to
the first host of the allocation and MASTER_PORT to a port derived from the job id. Alone, this is rank 0 of 1.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

from common.errors import PipelineError


class LaunchError(PipelineError):
    pass


@dataclass(frozen=True)
class Placement:
    rank: int
    local_rank: int    # on CUDA, the index of this process's GPU among those it sees (LOCAL_RANK as exported)
    world_size: int
    device: str    # "cuda:N" or "cpu"
    backend: str   # "nccl" or "gloo"


def _first_slurm_host(env) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError("under srun but SLURM_JOB_NODELIST is unset; export MASTER_ADDR")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        if any(c in nodelist for c in "[,"):
            raise LaunchError(f"cannot expand SLURM nodelist {nodelist!r} (no scontrol); export MASTER_ADDR") from None
        return nodelist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_placement(out: dict, names: tuple[str, str, str]) -> None:
    """RANK / WORLD_SIZE / LOCAL_RANK (as `names` came from the environment) are whole numbers with rank < world
    size: a rank outside the world waits in the rendezvous for peers that never come."""
    values = []
    for key, name in zip(("RANK", "WORLD_SIZE", "LOCAL_RANK"), names):
        text = out[key].strip()
        if not re.fullmatch(r"[0-9]+", text):
            raise LaunchError(f"{name} {out[key][:40]!r} is not a non-negative whole number; fix the launcher's "
                              f"environment")
        values.append(int(text))
    rank, world, _ = values
    if world < 1 or rank >= world:
        raise LaunchError(f"{names[0]} {rank} with {names[1]} {world}: a rank must be below the world size, which "
                          f"must be at least 1; fix the launcher's environment")


def resolve_env(env=None) -> dict:
    """The rendezvous variables torch.distributed reads, filled in from Slurm's or single-process defaults."""
    env = dict(os.environ if env is None else env)
    out = {}
    if "RANK" in env and "WORLD_SIZE" in env:
        out.update(RANK=env["RANK"], WORLD_SIZE=env["WORLD_SIZE"], LOCAL_RANK=env.get("LOCAL_RANK", "0"))
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        out.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"],
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        out["MASTER_ADDR"] = env.get("MASTER_ADDR") or _first_slurm_host(env)
        # Every task of a job step computes the same port without talking to the others.
        job = env.get("SLURM_JOB_ID", "0")
        if not env.get("MASTER_PORT") and not re.fullmatch(r"[0-9]+", job):
            raise LaunchError(f"SLURM_JOB_ID {job[:40]!r} is not a number, so no MASTER_PORT can be derived from it; "
                              f"export MASTER_PORT")
        out["MASTER_PORT"] = env.get("MASTER_PORT") or str(20000 + int(job) % 20000)
    else:
        out.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    _check_placement(out, names)
    out.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
    if "MASTER_PORT" not in out:
        if env.get("MASTER_PORT"):
            out["MASTER_PORT"] = env["MASTER_PORT"]
        elif out["WORLD_SIZE"] == "1":
            out["MASTER_PORT"] = str(_free_port())
        else:
            raise LaunchError("WORLD_SIZE > 1 but MASTER_PORT is unset; use torchrun/deepspeed/srun or export it")
    return out


def setup(env=None) -> Placement:
    """Export the rendezvous variables and pick device and backend; call before deepspeed.init_distributed."""
    import torch
    resolved = resolve_env(env)
    os.environ.update(resolved)
    rank, local_rank, world = int(resolved["RANK"]), int(resolved["LOCAL_RANK"]), int(resolved["WORLD_SIZE"])
    if torch.version.cuda and not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        # Expandable segments map memory into growing segments instead of fixed blocks, so the varying shapes of
        # a step (logits chunks, optimizer buffers) fragment less near a full GPU. The allocator reads this once,
        # at its first use: here, before any CUDA call of this process, whichever launcher started it.
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if torch.cuda.is_available():
        # `srun --gpus-per-task 1` leaves each task one visible GPU (index 0) whatever its local rank. DeepSpeed
        # 0.19.8 binds the GPU from LOCAL_RANK itself (init_process_group's device_id in comm/torch.py, the
        # engine's set_device and device in _set_distributed_vars, ZeRO-3's local device), so LOCAL_RANK is
        # exported as the index used here: left at SLURM_LOCALID it names a GPU the task cannot see.
        index = local_rank % torch.cuda.device_count()
        os.environ["LOCAL_RANK"] = str(index)
        torch.cuda.set_device(index)
        return Placement(rank, index, world, f"cuda:{index}", "nccl")
    # DeepSpeed picks its CPU accelerator on its own when torch has no CUDA; say so explicitly for clarity.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return Placement(rank, local_rank, world, "cpu", "gloo")


def first_error(error: str | None, world_size: int) -> str | None:
    """Every rank's error (None: it has none) gathered, and the first of them in rank order: the same answer on every
    rank, so that all stop alike when one cannot go on. A collective: every rank calls it together."""
    import torch.distributed as dist
    errors = [None] * world_size
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def init_distributed(place: Placement, timeout: timedelta) -> None:
    """deepspeed.init_distributed with the recipe's collective timeout (DeepSpeed 0.19.8's own default is 10
    minutes), and a failed build of DeepSpeed's CPU op said in one line.

    On CPU, DeepSpeed JIT-builds its shared-memory communication op (deepspeed_shm_comm) whenever it makes a
    process group, with torch's cpp_extension, which asks the C++ compiler for its version even when the build is
    cached; a machine without g++ died here with that traceback. Only errors raised from inside the build are
    translated: a rendezvous failure stays what it is.
    """
    import traceback

    import deepspeed
    from . import extensions
    extensions.use_venv_build_dir()  # where make install built DeepSpeed's ops: not rebuilt at each start-up
    if place.device == "cpu":
        extensions.wait_for_lock(extensions.op_build_dir())  # never a silent wait on a killed build's lock
    try:
        deepspeed.init_distributed(dist_backend=place.backend, timeout=timeout)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        frames = [frame.filename for frame in traceback.extract_tb(exc.__traceback__)]
        if place.device != "cpu" or not any("op_builder" in f or "cpp_extension" in f for f in frames):
            raise
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LaunchError(
            f"training on CPU needs a C++ compiler: DeepSpeed builds its CPU communication op with one (and ninja) "
            f"at start-up, and that failed ({cause}); install one (Debian/Ubuntu: apt-get install g++; or set CXX "
            f"to one) and rerun") from None
