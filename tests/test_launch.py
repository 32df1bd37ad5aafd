"""train.launch.setup on a CUDA machine as each launcher leaves it. CUDA cannot exist here (CPU-only torch), so
torch.cuda's device count, availability and set_device are replaced: the only mocks; DeepSpeed's own readers of
LOCAL_RANK are the real ones."""
import os

import pytest
import torch

from train import launch

RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR",
              "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


@pytest.fixture
def gpus(monkeypatch):
    """A machine where this process sees `gpus.count` CUDA devices; set_device calls are recorded."""
    for key in RENDEZVOUS:  # setup exports into os.environ: monkeypatch restores every key afterwards
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)

    class Fake:
        count = 1
        bound: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: Fake.count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: Fake.bound.append(index))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    return Fake


def slurm_task(localid: int, procid: int, ntasks: int = 8) -> dict:
    return {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NTASKS": str(ntasks),
            "SLURM_JOB_ID": "77", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}


def test_srun_gpus_per_task_binds_the_one_visible_gpu_for_deepspeed_too(gpus):
    # srun --gpus-per-task 1: local task 3 of a node sees one GPU, index 0.
    from deepspeed.comm.utils import get_local_rank_from_launcher
    gpus.count = 1
    place = launch.setup(slurm_task(localid=3, procid=3))
    assert (place.device, place.local_rank, place.rank) == ("cuda:0", 0, 3)
    assert gpus.bound == [0]
    # What DeepSpeed 0.19.8 binds: comm/torch.py's init_process_group(device_id=...) and the engine's
    # set_device(int(os.environ['LOCAL_RANK'])); dist.get_local_rank() reads the same variable.
    assert os.environ["LOCAL_RANK"] == "0" and get_local_rank_from_launcher() == 0


def test_all_gpus_visible_keeps_the_local_rank(gpus):
    # srun --gpus-per-node 8 (or torchrun): every task sees the node's 8 GPUs and takes its own.
    gpus.count = 8
    place = launch.setup(slurm_task(localid=5, procid=13, ntasks=16))
    assert (place.device, place.local_rank) == ("cuda:5", 5)
    assert gpus.bound == [5] and os.environ["LOCAL_RANK"] == "5"


def test_cuda_runs_get_expandable_segments_unless_the_user_set_the_allocator(gpus, monkeypatch):
    launch.setup({})
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    launch.setup({})
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")  # torch's newer name wins over the old
    launch.setup({})
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_a_cpu_build_of_torch_sets_no_cuda_allocator(monkeypatch):
    for key in RENDEZVOUS:
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert launch.setup({}).device == "cpu"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
