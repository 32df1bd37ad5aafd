"""Checkpoint faults: completion marks, unreadable or crafted checkpoints, a full disk during a save, a SIGKILL of
one of two ranks at each moment of a save. Real `python -m train` / `eval` / `model` processes on tiny_run copies."""
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch

from tests.conftest import PYTHON, REPO
from tests.fixtures_run import run_train, train_command
from tests.test_train_bad_input import assert_one_line_error
from train.rundir import FORMAT, RunDir
from train.rundir import checkpoints as ckpt


def tag(step: int, files=None, mark=True, saving=False, root=None):
    """A fake tag dir under root with files {name: bytes}; marked complete by the module's own write_mark."""
    d = root / f"global_step{step}"
    d.mkdir(parents=True)
    for name, size in (files or {"mp_rank_00_model_states.pt": 10}).items():
        (d / name).write_bytes(b"x" * size)
    if saving:
        (d / ckpt.SAVING).write_text("{}")
    if mark:
        ckpt.write_mark(d, step, 1)
    return d


def names(dirs):
    return [d.name for d in dirs]


def test_only_marked_tags_are_complete(tmp_path):
    root = tmp_path / "checkpoints"
    tag(2, root=root)
    tag(4, root=root, mark=False, saving=True)  # a save cut short: files there, no mark
    cut = tag(6, root=root)
    (cut / "mp_rank_00_model_states.pt").write_bytes(b"x" * 3)  # a file that is not what the mark recorded
    assert names(ckpt.complete_tags(root)) == ["global_step2"]
    assert "did not finish" in ckpt.incomplete_reason(root / "global_step4")
    assert "has 3 bytes" in ckpt.incomplete_reason(cut)
    (root / "latest").write_text("global_step6")  # `latest` does not make a tag complete
    assert names(ckpt.complete_tags(root)) == ["global_step2"]
    tag(8, root=root, mark=False)  # no mark and no saving.json: not complete, whatever `latest` says
    (root / "latest").write_text("global_step8")
    assert names(ckpt.complete_tags(root)) == ["global_step2"]


def test_rotation_never_deletes_an_unfinished_tag_or_the_newest_complete_one(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        tag(step, root=root)
    tag(5, root=root, mark=False, saving=True)
    assert ckpt.rotate(root, keep_last=1, keep_every=2) == [1, 3]
    assert names(ckpt.tag_dirs(root)) == ["global_step2", "global_step4", "global_step5"]


def copy_checkpoints(source_run, run_dir, steps):
    RunDir(run_dir).start()
    for step in steps:
        shutil.copytree(source_run / "checkpoints" / f"global_step{step}", run_dir / "checkpoints" / f"global_step{step}")
    return run_dir / "checkpoints"


def test_each_rank_fsyncs_the_files_it_wrote_not_every_ranks(tmp_path, monkeypatch):
    """Only the writing node's page cache holds a file: a rank fsyncs its own (and files of no known writer), not
    the other ranks' (800 ranks x 1,600 ZeRO-3 files would be 1.3M metadata calls per checkpoint)."""
    tag = tmp_path / "global_step6"
    tag.mkdir()
    names = ["mp_rank_00_model_states.pt", "notes.txt"] + [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(4) for kind in ("optim", "model")]
    for name in names:
        (tag / name).write_bytes(b"x")
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    ckpt.fsync_own_files(tag, rank=1)
    assert sorted(synced) == sorted(["global_step6", "notes.txt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
                                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
    synced.clear()
    ckpt.fsync_own_files(tag, rank=0)
    assert sorted(synced) == sorted(["global_step6", "notes.txt", "mp_rank_00_model_states.pt",
                                     "zero_pp_rank_0_mp_rank_00_model_states.pt",
                                     "zero_pp_rank_0_mp_rank_00_optim_states.pt"])


def test_resume_skips_an_unreadable_newest_checkpoint_naming_it(tmp_path, tiny_run, tiny_dataset):
    run_dir = tmp_path / "run"
    ckpts = copy_checkpoints(tiny_run, run_dir, (3, 6))
    optim = next((ckpts / "global_step6").glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])  # lost data the mark cannot see
    ckpt.write_mark(ckpts / "global_step6", 6, 1)
    out = run_train(train_command(run_dir, tiny_dataset))
    skipped = [line for line in out.stdout.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and skipped[0].startswith("checkpoint global_step6 skipped: cannot read ") \
        and optim.name in skipped[0], out.stdout[-3000:]
    assert f"resuming from {ckpts / 'global_step3'} at step 3" in out.stdout
    assert names(ckpt.complete_tags(ckpts)) == ["global_step3", "global_step6"]  # step 6 saved again, whole
    ckpt.verify(ckpts / "global_step6")


def test_no_readable_checkpoint_is_one_line(tmp_path, tiny_run, tiny_dataset):
    run_dir = tmp_path / "run"
    ckpts = copy_checkpoints(tiny_run, run_dir, (3,))
    states = ckpts / "global_step3" / "mp_rank_00_model_states.pt"
    states.write_bytes(b"not a checkpoint")
    ckpt.write_mark(ckpts / "global_step3", 3, 1)
    result = run_train(train_command(run_dir, tiny_dataset), check_rc=None)
    assert_one_line_error(result, 1, "no readable checkpoint in", "global_step3 skipped")
    assert f"checkpoint global_step3 skipped: cannot read {states}" in result.stdout


def test_a_run_dir_or_checkpoint_of_an_earlier_version_is_refused_in_one_line(tmp_path, tiny_run, tiny_dataset,
                                                                               shared_dir):
    """Nothing reads the artefacts of earlier versions: train, eval watch, eval checkpoint and model sample each
    refuse them in one line, and write nothing."""
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old, ignore=shutil.ignore_patterns("eval", "tb"))
    (old / "format.json").unlink()  # as every run written before the format version was
    for mark in (old / "checkpoints").glob(f"*/{ckpt.MARK}"):
        mark.write_text(json.dumps({k: v for k, v in json.loads(mark.read_text()).items() if k != "format"}))
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    hellaswag = str(shared_dir / "data" / "hellaswag_val.jsonl")
    tag = old / "checkpoints" / "global_step6"
    refusals = {
        "train": (train_command(old, tiny_dataset), f"{old} was written by an earlier version"),
        "eval watch": ([PYTHON, "-m", "eval", "watch", str(old), "--once", "--hellaswag-file", hellaswag],
                       f"{old} was written by an earlier version"),
        "eval checkpoint": ([PYTHON, "-m", "eval", "checkpoint", str(tag), "--hellaswag-file", hellaswag],
                            f"{tag} was written by an earlier version"),
        "model sample": ([PYTHON, "-m", "model", "sample", str(old), "--num", "1"],
                         f"{old} was written by an earlier version"),
    }
    for what, (cmd, line) in refusals.items():
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert_one_line_error(result, 1, line, f"(format 0, this one reads {FORMAT}): start a new run_dir")
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before


def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_stays(tmp_path, tiny_run, tiny_dataset):
    run_dir = tmp_path / "run"
    ckpts = copy_checkpoints(tiny_run, run_dir, (3,))

    def file_size_limit():  # writes past 5 MB fail with EFBIG, as writes to a full disk fail with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (5_000_000, 5_000_000))
    result = run_train(train_command(run_dir, tiny_dataset), check_rc=None, preexec_fn=file_size_limit)
    assert_one_line_error(result, 1, f"checkpoint {ckpts / 'global_step6'} not saved: rank 0",
                          "the resume point stays global_step3")
    assert names(ckpt.complete_tags(ckpts)) == ["global_step3"]
    assert not (ckpts / "global_step6" / ckpt.MARK).exists() and not (ckpts / "latest").exists()
    out = run_train(train_command(run_dir, tiny_dataset))  # space again: resumes from the previous one
    assert f"resuming from {ckpts / 'global_step3'} at step 3" in out.stdout
    assert names(ckpt.complete_tags(ckpts)) == ["global_step3", "global_step6"]


class RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint file does to a trusting loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(tag_dir, marker):
    """Plant code in a tag's rank-0 model-states file, keeping everything else (and the mark) consistent."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    states = torch.load(path, map_location="cpu", weights_only=False)  # our own test file: trusted
    states["extra"] = RunsCode(marker)
    torch.save(states, path)
    ckpt.write_mark(tag_dir, states["step"], 1)
    return path


def test_a_crafted_checkpoint_file_is_refused_by_every_loader_and_runs_nothing(tmp_path, tiny_run, tiny_dataset,
                                                                              shared_dir):
    run_dir = tmp_path / "run"
    ckpts = copy_checkpoints(tiny_run, run_dir, (3, 6))
    marker = tmp_path / "code-ran"
    crafted = [craft(ckpts / f"global_step{s}", marker) for s in (3, 6)]
    # The trust is what the module refuses, not what torch.load would do: the file really runs code when trusted.
    torch.load(crafted[0], weights_only=False)
    assert marker.exists()
    marker.unlink()

    result = run_train(train_command(run_dir, tiny_dataset), check_rc=None)
    assert_one_line_error(result, 1, "no readable checkpoint")
    for path in reversed(crafted):
        assert f"{path}: refused to load: it needs posix.system" in result.stdout, result.stdout[-3000:]
    tag_dir = ckpts / "global_step6"
    commands = {
        "eval checkpoint": [PYTHON, "-m", "eval", "checkpoint", str(tag_dir), "--limit", "1",
                            "--hellaswag-file", str(shared_dir / "data" / "hellaswag_val.jsonl"),
                            "--out", str(tmp_path / "result.json")],
        "eval export": [PYTHON, "-m", "eval", "export", str(tag_dir), "--out", str(tmp_path / "hf")],
        "model sample": [PYTHON, "-m", "model", "sample", str(run_dir), "--num", "1", "--max-new-tokens", "2"],
    }
    for what, cmd in commands.items():
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert_one_line_error(result, 1, f"{crafted[1]}: refused to load: it needs posix.system")
    assert not marker.exists()
    assert not (tmp_path / "result.json").exists() and not (tmp_path / "hf").exists()


# ---- a SIGKILL of one of two ranks at three moments of a save ----------------------------------------------------
RANK_FILES = {0: ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
              1: ("zero_pp_rank_1_mp_rank_00_optim_states.pt",)}


def ranks_of(proc):
    found = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            env = p.environ()
            if "RANK" in env and "LOCAL_RANK" in env:
                found[int(env["RANK"])] = p
    return found


def moment(ckpts, sizes, after_step, kind):
    """The first tag after `after_step` that is in state `kind` now, else None. kind: (victim rank, state)."""
    rank, state = kind
    for tag_dir in ckpt.tag_dirs(ckpts):
        if ckpt.step_of(tag_dir.name) <= after_step or (tag_dir / ckpt.MARK).exists():
            continue
        have = {}
        for name in sizes:
            try:
                have[name] = (tag_dir / name).stat().st_size
            except FileNotFoundError:
                pass
        if state == "writing":  # one of the victim's files has appeared and is not yet whole
            if any(0 <= have.get(n, -1) < sizes[n] for n in RANK_FILES[rank]):
                return tag_dir
        elif have == sizes:  # "written": every file whole, the mark not yet there
            return tag_dir
    return None


def whole(tag_dir, sizes, rank, timeout=60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if all((tag_dir / n).stat().st_size == sizes[n] for n in RANK_FILES[rank]):
                return True
        time.sleep(0.01)
    return False


def kill_at(cmd, ckpts, sizes, kind, timeout=240):
    """Run cmd; SIGKILL the victim rank the moment a save is in state kind. Returns (tag dir, complete before).

    Rank 1 is stopped (SIGSTOP) mid-write until rank 0 has finished its own files, then killed: the moment when
    DeepSpeed's rank 0 has already written `latest` (the old rule took the tag for complete then).
    """
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ranks, deadline = {}, time.time() + timeout
        start = max([ckpt.step_of(t.name) for t in ckpt.complete_tags(ckpts)] or [0])
        while time.time() < deadline and proc.poll() is None:
            hit = moment(ckpts, sizes, start, kind)
            if hit is not None:
                ranks = ranks or ranks_of(proc)
                if kind[0] == 1:
                    ranks[1].suspend()
                    assert whole(hit, sizes, 0), "rank 0 never finished its files"
                    time.sleep(0.5)  # rank 0 is past its files: waiting for rank 1 (DeepSpeed: `latest` written)
                ranks[kind[0]].send_signal(signal.SIGKILL)
                complete_then = names(ckpt.complete_tags(ckpts))
                assert not (hit / ckpt.MARK).exists()
                return hit, complete_then
            time.sleep(0.001)
        pytest.fail(f"never saw a save in state {kind} (exit {proc.poll()})")
    finally:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=60)


def test_sigkill_of_one_rank_during_a_save_resumes_from_a_complete_checkpoint(tmp_path, tiny_dataset, shared_dir):
    from tests.fixtures_run import free_port
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"

    def cmd(steps):  # each run goes further than the last: a recipe change the resume must be allowed
        return train_command(run_dir, tiny_dataset, f"schedule.max_steps={steps}", "checkpoint.every=1",
                             "checkpoint.keep_last=30", "eval.every=0", "sample.every=0", "log.tensorboard=false",
                             nproc=2, port=free_port()) + ["--allow-change", "schedule.max_steps"]
    run_train(cmd(4))  # whole saves: the sizes every later tag's files will have
    first = ckpts / "global_step4"
    sizes = {n: (first / n).stat().st_size for name_set in RANK_FILES.values() for n in name_set}
    zoo = tmp_path / "zoo" / "checkpoints"  # every tag cut short, beside one whole one, for eval watch
    RunDir(zoo.parent).start()
    shutil.copytree(first, zoo / first.name)

    for i, kind in enumerate([(0, "writing"), (1, "writing"), (0, "written")]):
        steps = 16 + 12 * i
        hit, complete_then = kill_at(cmd(steps), ckpts, sizes, kind)
        shutil.copytree(hit, zoo / hit.name, dirs_exist_ok=True)
        if (ckpts / "latest").exists():
            shutil.copy(ckpts / "latest", zoo / "latest")
        assert hit.name not in names(ckpt.complete_tags(ckpts)), kind
        if kind[1] == "written":  # every file was there, whole: only the mark is missing
            assert {n: (hit / n).stat().st_size for n in sizes} == sizes
        newest = ckpt.newest_complete(ckpts)
        assert newest is not None and newest.name == complete_then[-1]
        out = run_train(cmd(ckpt.step_of(hit.name)))  # resume, and finish the killed step again
        assert f"resuming from {newest} at step {ckpt.step_of(newest.name)}" in out.stdout, out.stdout[-2000:]
        ckpt.verify(hit)  # saved again, whole

    hellaswag = shared_dir / "data" / "hellaswag_val.jsonl"
    watch = subprocess.run([PYTHON, "-m", "eval", "watch", str(zoo.parent), "--once", "--limit", "1",
                            "--batch-size", "4", "--hellaswag-file", str(hellaswag)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert watch.returncode == 0, watch.stderr[-3000:]
    scored = [json.loads(line)["tag"] for line in (zoo.parent / "eval" / "results.jsonl").read_text().splitlines()]
    assert scored == ["global_step4"], (scored, watch.stdout)
