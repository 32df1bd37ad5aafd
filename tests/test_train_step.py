"""The training step as a GPU would run it, checked on CPU with a real DeepSpeed engine (ZeRO-1 as the GPU recipes,
gloo, 1 rank): the process group's timeout, host syncs per update, compiled graphs; and ZeRO-0's (the tiny recipe's). Each case runs in its own process, as train
does, so process groups and compiled graphs never leak between tests."""
import json
import subprocess
import textwrap

import pytest

from tests.conftest import PYTHON, REPO
from tests.fixtures_run import read_metrics, run_train, train_command

SHAPE = ["deepspeed=configs/deepspeed/zero1.json", "batch.seq_len=32", "batch.micro_batch=2", "batch.total_tokens=128", "eval.every=0", "sample.every=0",
         "checkpoint.every=0", "log.tensorboard=false"]


def probe(code: str, run_dir, dataset, *sets: str, allow: tuple = (), timeout: int = 300) -> dict:
    """Run `code` with `trainer` (a train.trainer.Trainer of the tiny recipe and `sets`, accepting changes of the
    `allow` keys on resume) in a fresh process; the code prints one JSON line last, returned here."""
    script = textwrap.dedent(f"""
        import json, sys
        import torch
        import torch.distributed as dist
        from train.recipe import load
        from train.trainer import Trainer
        trainer = Trainer(load(sys.argv[1], sys.argv[2:]), allow_change={list(allow)!r})
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


SYNC_COUNTER = """
    import collections, traceback
    from deepspeed.accelerator import get_accelerator
    from train.stop import StopFlag
    counts, active = collections.Counter(), [False]

    def counted(name, original):
        def call(*args, **kwargs):
            if active[0]:
                frames = [f.filename for f in traceback.extract_stack()[:-1]]
                ours = [f for f in frames if "/site-packages/" not in f and "<string>" not in f]
                # the project's own reads of a tensor's value; any device synchronize or all_reduce, whoever calls it
                if name in ("synchronize", "all_reduce") or (ours and frames[-1] == ours[-1]):
                    counts[name] += 1
            return original(*args, **kwargs)
        return call
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    torch.cuda.synchronize = counted("synchronize", torch.cuda.synchronize)
    accelerator = get_accelerator()
    accelerator.synchronize = counted("synchronize", accelerator.synchronize)
    dist.all_reduce = counted("all_reduce", dist.all_reduce)
    step, calls = trainer.train_step, [0]

    def train_step():
        calls[0] += 1
        active[0] = 4 <= calls[0] < 14  # updates 4-13 in full, logging and all: steady state
        return step()
    trainer.train_step = train_step
"""


@pytest.mark.parametrize("stage", [0, 1])
def test_one_host_sync_per_update_and_no_deepspeed_timer(stage, tiny_dataset, tmp_path):
    # CPU has no device to wait for, so what is counted is every call that would wait for a GPU: the trainer's
    # own reads of tensor values (.item, .tolist, float/int/bool of a tensor) and any synchronize, DeepSpeed's
    # throughput timer's included. DeepSpeed's optimizer checks its gradient norm itself (once per step in the
    # bf16 GPU configuration); that is not the trainer's to remove and is not counted here.
    code = textwrap.dedent(SYNC_COUNTER) + textwrap.dedent("""
        trainer.run(StopFlag())
        active[0] = False
        lines = [json.loads(l) for l in open(sys.argv[2].split("=", 1)[1] + "/metrics.jsonl")]
        print(json.dumps({"counts": counts, "updates": calls[0], "lines": len(lines),
                          "norms": sum(l["grad_norm"] is not None for l in lines)}))
    """)
    out = probe(code, tmp_path / "run", tiny_dataset, "schedule.max_steps=14", "log.every=1",
                f"deepspeed=configs/deepspeed/zero{stage}.json")
    assert out["updates"] == 14 and out["lines"] == 14 and out["norms"] == 14  # every line, its norm read late
    reduces = out["counts"].pop("all_reduce", 0)
    assert sum(out["counts"].values()) <= 10, out["counts"]  # 10 steady-state updates: at most one sync each
    assert out["counts"].get("synchronize", 0) == 0, out["counts"]
    if stage == 0:  # one rank: the trainer's own all_reduce (loss and stop flag) and no gradient reduction
        assert reduces == 10, reduces


def test_metrics_are_fsynced_by_time_and_before_each_checkpoint_not_per_line(tiny_dataset, tmp_path):
    # os.fsync is wrapped to note, for every fsync of metrics.jsonl, the steps the file then held (what a machine
    # crash would keep); the time cadence is set out of reach, so only the checkpoints should make it durable.
    code = """
        import os
        from train.metrics import RunLog
        from train.stop import StopFlag
        RunLog.DURABLE_EVERY_S = 1e9
        metrics = sys.argv[2].split("=", 1)[1] + "/metrics.jsonl"
        durable, checks, fsync = [], [], os.fsync

        def fsync_noting(fd):
            if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(metrics):
                durable.append(sorted({json.loads(l)["step"] for l in open(metrics)}))
            return fsync(fd)
        os.fsync = fsync_noting
        save = trainer.save

        def save_checking():
            save()  # returns once the checkpoint is complete (its mark written)
            checks.append([trainer.step, bool(durable) and trainer.step in durable[-1], len(durable)])
        trainer.save = save_checking
        trainer.run(StopFlag())
        print(json.dumps({"checks": checks, "fsyncs": len(durable)}))
    """
    out = probe(code, tmp_path / "run", tiny_dataset, "schedule.max_steps=8", "checkpoint.every=4", "log.every=1")
    # At each completed checkpoint its own step's line was durable; one fsync per checkpoint, none per line.
    assert out["checks"] == [[4, True, 1], [8, True, 2]], out
    assert out["fsyncs"] <= 3, out  # the two checkpoints, and the close at the end


def test_runlog_makes_lines_durable_at_most_every_few_seconds(tmp_path, monkeypatch):
    import os

    import train.metrics as metrics
    clock, fsyncs = [1000.0], []
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(clock[0]) or real_fsync(fd))
    log = metrics.RunLog(tmp_path, tensorboard=False)
    for step in range(1, 101):  # 100 lines, 0.2 s apart: 20 seconds
        clock[0] += 0.2
        log.write({"step": step, "loss": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 100
    # one fsync per 5 s (samples.jsonl does not exist here), not 100 (an fsync per line before)
    assert 3 <= len(fsyncs) <= 4 and all(b - a >= 5 for a, b in zip(fsyncs, fsyncs[1:])), fsyncs


def test_compiled_steps_trace_once_without_graph_breaks_and_again_after_a_resume(tiny_dataset, tmp_path):
    # torch.compile on CPU (inductor, C++): the training step and the validation step (eval mode, no grad) are one
    # graph each: 2 graphs in all over 10 updates and 2 validations, none broken, none recompiled (a recompile
    # adds a graph); the resumed process compiles the same two once more and nothing else.
    code = """
        from torch._dynamo.utils import counters
        from train.stop import StopFlag
        trainer.run(StopFlag())
        print(json.dumps({"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values()),
                          "step": trainer.step, "resumed": getattr(trainer, "resumed_from", None)}))
    """
    sets = ["compile=true", "eval.every=5", "eval.val_batches=2", "checkpoint.every=5"]
    first = probe(code, tmp_path / "run", tiny_dataset, *sets, "schedule.max_steps=10", timeout=600)
    assert first == {"graphs": 2, "breaks": 0, "step": 10, "resumed": None}
    again = probe(code, tmp_path / "run", tiny_dataset, *sets, "schedule.max_steps=13", allow=("schedule.max_steps",),
                  timeout=600)
    assert again == {"graphs": 2, "breaks": 0, "step": 13, "resumed": "global_step10"}


def test_every_gpu_recipe_compiles_with_a_zero_stage_that_allows_it():
    from train.recipe import batch_plan, deepspeed_config, load
    recipes = sorted((REPO / "configs/train").glob("gpt2-*.yaml"))
    assert len(recipes) == 4
    for path in recipes:
        recipe = load(path)
        assert recipe.compile and not recipe.activation_checkpointing, path
        deepspeed_config(recipe, batch_plan(recipe, 8))  # refuses compile with ZeRO-3


def test_zero0_fp32_clips_and_reports_the_norm_as_zero1_does(tiny_dataset, tmp_path):
    # At ZeRO-0 fp32 the trainer clips (DeepSpeed would, but drops the norm): the same run at ZeRO-1, where
    # DeepSpeed clips, logs the same norms (there summed in fp64) and the same losses. Early norms are above
    # grad_clip 0.5, so the clip is applied, not just measured.
    runs = {}
    for stage in (0, 1):
        run_dir = tmp_path / f"zero{stage}"
        run_train(train_command(run_dir, tiny_dataset, f"deepspeed=configs/deepspeed/zero{stage}.json",
                                "optim.grad_clip=0.5", "schedule.max_steps=4", "eval.every=0", "sample.every=0",
                                "checkpoint.every=0"))
        runs[stage] = read_metrics(run_dir)[0]
    norms = {stage: [r["grad_norm"] for r in lines] for stage, lines in runs.items()}
    assert all(n is not None and n > 0.5 for n in norms[0][:2]), norms
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    assert [r["loss"] for r in runs[0]] == pytest.approx([r["loss"] for r in runs[1]], rel=1e-5)


def test_a_cpu_update_reuses_freed_memory_instead_of_faulting_it_in_again(tiny_dataset, tmp_path):
    # Each update frees and allocates the same tens of MiB (a chunk of logits, the gradients). With glibc's
    # defaults these went back to the kernel and were page-faulted in again: about 28,000 minor faults per update
    # of the tiny recipe, about a fifth of its time on this CPU. The trainer keeps them for reuse (common.device).
    code = """
        import resource
        trainer.build()
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            trainer.train_step()
        before = faults()
        for _ in range(10):
            trainer.train_step()
        print(json.dumps({"per_update": (faults() - before) / 10, "kept": trainer.allocator_reuses}))
    """
    out = probe(code, tmp_path / "run", tiny_dataset, "deepspeed=configs/deepspeed/zero0.json",
                "batch.total_tokens=256", "batch.seq_len=64")
    assert out["kept"] is True
    assert out["per_update"] < 2000, out  # 28,000 with glibc's defaults, about 300 kept
