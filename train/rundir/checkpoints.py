"""RUN/checkpoints: completeness, scanning, resume choice, collective saving, rotation, safe reading.

Train saves, rotates and resumes through this module, `eval watch` scans with it, and consolidate.py reads weights
for `eval checkpoint` / `eval export` / `model sample` through its safe reader.

Layout of RUN/checkpoints/ (DeepSpeed writes each tag's *.pt files; this module writes everything else):

    global_stepN/                 the tag of step N: DeepSpeed's *model_states.pt and *optim_states.pt files, plus
    global_stepN/saving.json      written by rank 0 before any rank writes the tag's files;
    global_stepN/complete.json    the completion mark: written (atomically) by rank 0 once every rank has written
                                  and fsynced its files, after a barrier: format version, step, world size, each
                                  file and its size
    global_stepN_universal/       the tag converted by DeepSpeed's ds_to_universal (resume on another world size)
    latest                        the newest complete tag's name, written (atomically) after its mark, for
                                  DeepSpeed's own tools; this project decides completeness by the marks

A tag is complete when its mark is there, of this format version, and every file it lists has the recorded size.
A tag with saving.json and no mark was cut short and is never read; a mark of another format version is refused.

Trust: a checkpoint file is a pickle, and unpickling runs whatever code the file names. Every file is therefore
read with torch.load(weights_only=True) and an allow-list of exactly the classes this trainer's DeepSpeed
checkpoints hold (safe_globals); a file that needs anything else is refused with its name and the class.
DeepSpeed's own readers (engine.load_checkpoint, zero_to_fp32, ds_to_universal) unpickle without restriction,
so every file of a tag passes the safe reader before they are called.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import files
from common.errors import PipelineError

from . import CHECKPOINTS, FORMAT, MARK, SAVING, RunDir, earlier_version
from ..launch import first_error
from .identity import record_rotation

TAG_RE = re.compile(r"^global_step(\d+)$")
LATEST = "latest"
UNIVERSAL_SUFFIX = "_universal"
# What train puts into client_state (rides in rank 0's model-states file). param_names: the parameter names of
# each optimizer param group in the order the trainer built them, which is the order of the fp32 master copies.
CLIENT_KEYS = ("model_config", "config", "step", "tokens_seen", "loader", "rng", "world_size", "param_names")
# torch.save's writer reports a failed write (a full disk, a quota, a file size limit) as a RuntimeError.
_TORCH_WRITE_FAILURE = re.compile(r"PytorchStreamWriter failed|unexpected pos \d+ vs \d+|write\(\): fd \d+ failed")


class CheckpointError(PipelineError):
    """A checkpoint that cannot be read, saved or trusted; the message names the file or tag and says why."""


# ---- names ---------------------------------------------------------------------------------------------------
def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(name: str) -> int | None:
    match = TAG_RE.match(name)
    return int(match.group(1)) if match else None


def checkpoints_dir(path) -> Path:
    """RUN/checkpoints for a run dir; the path itself when it is a checkpoints dir."""
    path = Path(path)
    return path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path


# ---- scanning and completeness -------------------------------------------------------------------------------
def tag_dirs(ckpt_dir) -> list[Path]:
    """Every global_stepN directory, oldest first, complete or not."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(step_of(p.name), p) for p in ckpt_dir.iterdir() if step_of(p.name) is not None and p.is_dir()]
    return [p for _, p in sorted(found)]


def incomplete_reason(tag_dir) -> str | None:
    """Why tag_dir's completion mark does not vouch for it (None: it does). Only stats the files.

    A mark of another format version is not a reason to skip the tag but an error: the run was written by another
    version of this project, and going on would mix the two.
    """
    tag_dir = Path(tag_dir)
    try:
        mark = files.read_json(tag_dir / MARK)
        listed = dict(mark["files"])
    except FileNotFoundError:
        if (tag_dir / SAVING).exists():
            return f"its save did not finish ({SAVING}, no {MARK})"
        return f"no {MARK}"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{tag_dir / MARK} is not a valid completion mark ({type(exc).__name__}: {exc})"
    if mark.get("format") != FORMAT:
        raise CheckpointError(earlier_version(tag_dir, mark.get("format")))
    for name, size in sorted(listed.items()):
        try:
            actual = (tag_dir / name).stat().st_size
        except FileNotFoundError:
            return f"{name} (listed in {MARK}) is missing"
        if actual != size:
            return f"{name} has {actual} bytes, {MARK} recorded {size}"
    return None


def complete_tags(ckpt_dir) -> list[Path]:
    """The complete tags of RUN/checkpoints, oldest first (see the module docstring for the rule)."""
    return [t for t in tag_dirs(ckpt_dir) if incomplete_reason(t) is None]


def newest_complete(ckpt_dir) -> Path | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


# ---- safe reading --------------------------------------------------------------------------------------------
def safe_globals() -> list:
    """Exactly the classes DeepSpeed 0.19's checkpoints of this trainer contain, beyond tensors and builtins.

    Found by loading every file of ZeRO 0-3 checkpoints (fp32, bf16, BF16_Optimizer, universal) with
    weights_only=True: the numpy ones come from client_state's RNG states (np.random.get_state()).
    """
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
    return [LossScaler, ZeroStageEnum, fragment_address,
            np.ndarray, np.dtype, type(np.dtype(np.uint32)), multiarray._reconstruct]


def _refused_global(message: str) -> str | None:
    """The class or function name in torch's weights_only refusal, if that is what the error is."""
    for pattern in (r"GLOBAL ([\w.]+)", r"but got <class '([\w.]+)'>"):
        match = re.search(pattern, message)
        if match:
            return match.group(1)
    return None


def safe_load(path):
    """torch.load of one checkpoint file, unpickling nothing outside safe_globals(); memory-mapped where possible."""
    import pickle

    import torch
    path = Path(path)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's import narrates on stdout; samples go there
        allowed = safe_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # the pre-zip format
    except pickle.UnpicklingError as exc:
        refused = _refused_global(str(exc))
        if refused:
            raise CheckpointError(
                f"{path}: refused to load: it needs {refused}, which is not among the classes this trainer's "
                f"checkpoints contain, and unpickling it could run code (only files that need nothing else are "
                f"read)") from None
        # torch wraps the unpickler's own complaint (e.g. "Unsupported operand 110": not a pickle) in advice
        detail = [line for line in str(exc).splitlines() if line.strip() and not line.startswith(
            ("Weights only load failed", "Please file an issue", "Check the documentation"))]
        raise CheckpointError(f"cannot read {path}: {(detail or ['not a torch checkpoint'])[0].strip()}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as exc:  # a truncated or foreign file: torch raises several kinds
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def check_readable(tag_dir) -> None:
    """Every *.pt file under tag_dir passes safe_load (run before anything hands the tag to DeepSpeed)."""
    found = sorted(Path(tag_dir).rglob("*.pt"))
    if not found:
        raise CheckpointError(f"{tag_dir} holds no *.pt file")
    for path in found:
        safe_load(path)


def rank0_states_file(tag_dir) -> Path:
    """Rank 0's model-states file, which carries client_state (ZeRO-3 names it zero_pp_rank_0_mp_rank_00_...)."""
    tag_dir = Path(tag_dir)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(f"partial checkpoint {tag_dir}: rank 0's model states file is missing")


def read_client_state(tag_dir) -> dict:
    """client_state of a tag without building an engine (memory-mapped, so cheap even for big models)."""
    path = rank0_states_file(tag_dir)
    state = safe_load(path)
    missing = [k for k in CLIENT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: no {', '.join(missing)} in client_state; not written by this trainer")
    return {k: state[k] for k in CLIENT_KEYS if k in state}


def verify(tag_dir) -> dict:
    """A complete tag's client_state, after checking its mark and every file with the safe reader."""
    problem = incomplete_reason(tag_dir)
    if problem:
        raise CheckpointError(f"partial checkpoint {tag_dir}: {problem}")
    check_readable(tag_dir)
    return read_client_state(tag_dir)


def resume_candidate(ckpt_dir, log=print) -> tuple[Path | None, dict | None]:
    """The newest complete checkpoint that reads, and its client_state; (None, None) when there is none at all.

    A newer tag that was cut short, or is complete but does not read, is skipped with one line saying why; when
    complete tags exist but none reads, that is an error (starting over would overwrite them). A run directory of
    another format version is refused first.
    """
    ckpt_dir = Path(ckpt_dir)
    RunDir(ckpt_dir.parent).check_format()
    complete = complete_tags(ckpt_dir)
    newest = complete[-1] if complete else None
    for tag in tag_dirs(ckpt_dir):
        if newest is None or step_of(tag.name) > step_of(newest.name):
            log(f"checkpoint {tag.name} ignored: {incomplete_reason(tag)}")
    skipped = []
    for tag in reversed(complete):
        try:
            check_readable(tag)
            return tag, read_client_state(tag)
        except CheckpointError as exc:
            log(f"checkpoint {tag.name} skipped: {exc}")
            skipped.append(tag.name)
    if skipped:
        raise CheckpointError(f"no readable checkpoint in {ckpt_dir} ({', '.join(skipped)} skipped, see above); "
                              f"move the broken ones aside or use a new run_dir")
    return None, None


# ---- saving --------------------------------------------------------------------------------------------------
def _write_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and bool(_TORCH_WRITE_FAILURE.search(str(exc))))


def _describe_failure(exc: BaseException, where: Path) -> str:
    if isinstance(exc, OSError):
        what = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc.strerror or exc)
    else:
        what = f"torch.save: {_first_line(exc)}"
    with contextlib.suppress(OSError):
        what += f"; {shutil.disk_usage(where).free / 2**30:.1f} GiB free there"
    return what


def save(engine, ckpt_dir, step: int, client_state: dict, rank: int, world_size: int) -> Path:
    """Save tag global_step<step> on every rank, then mark it complete; call on all ranks together.

    A write that fails on any rank (a full disk, a quota) stops every rank with one CheckpointError: the tag gets
    no mark, `latest` is not moved, so the previous complete checkpoint stays the resume point.
    """
    import torch.distributed as dist
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    previous = newest_complete(ckpt_dir) if rank == 0 else None

    def fail_if_any(error: str | None) -> None:
        first = first_error(error, world_size)
        if first:
            keep = previous.name if previous is not None else "none (no complete checkpoint yet)"
            raise CheckpointError(f"checkpoint {tag_dir} not saved: {first}; the resume point stays {keep}")

    error = None
    if rank == 0:
        try:
            tag_dir.mkdir(parents=True, exist_ok=True)
            # saving.json before the old mark goes: a tag saved again always says why it has no mark.
            files.write_json(tag_dir / SAVING, {"step": step, "world_size": world_size, "host": socket.gethostname(),
                                                "pid": os.getpid(), "started": _now()})
            (tag_dir / MARK).unlink(missing_ok=True)
            shutil.rmtree(ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)  # converted from the old one
        except OSError as exc:
            error = f"rank 0: {_describe_failure(exc, ckpt_dir)}"
    fail_if_any(error)  # before DeepSpeed's own collectives, so that every rank leaves here alike

    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as exc:
        if not _write_failure(exc):
            raise
        error = f"rank {rank}: {_describe_failure(exc, ckpt_dir)}"
        # Writes come after DeepSpeed's last collective but one: the barrier that ends save_checkpoint, which
        # the ranks whose writes succeeded are waiting in.
        dist.barrier()
    else:
        try:
            fsync_own_files(tag_dir, rank)
        except OSError as exc:
            error = f"rank {rank}: {_describe_failure(exc, ckpt_dir)}"
    fail_if_any(error)  # every rank has written and fsynced: rank 0 may mark

    if rank == 0:
        try:
            write_mark(tag_dir, step, world_size)
            files.write_text(ckpt_dir / LATEST, tag)
        except OSError as exc:
            error = f"rank 0, writing its completion mark: {_describe_failure(exc, ckpt_dir)}"
    fail_if_any(error)
    return tag_dir


def write_mark(tag_dir: Path, step: int, world_size: int) -> None:
    listed = {p.relative_to(tag_dir).as_posix(): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
              if p.is_file() and p.name not in (MARK, SAVING) and files.TMP_MARK not in p.name}
    files.write_json(tag_dir / MARK, {"format": FORMAT, "tag": tag_dir.name, "step": step,
                                      "world_size": world_size, "files": listed, "written": _now()})
    (tag_dir / SAVING).unlink(missing_ok=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def rotate(ckpt_dir, keep_last: int, keep_every: int) -> list[int]:
    """Delete complete tags that are neither among the newest keep_last nor a multiple of keep_every; rank 0 only.

    Tags that are not complete are never touched, and the newest complete one is always kept.
    """
    ckpt_dir = Path(ckpt_dir)
    steps = [step_of(t.name) for t in complete_tags(ckpt_dir)]
    keep = set(steps[-max(keep_last, 1):])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    removed = []
    for step in steps:
        if step not in keep:
            # Said before it goes, so that eval can tell which checkpoints it never got to score.
            record_rotation(ckpt_dir / tag_for(step), keep_last, keep_every)
            for suffix in ("", UNIVERSAL_SUFFIX):
                shutil.rmtree(ckpt_dir / f"{tag_for(step)}{suffix}", ignore_errors=True)
            removed.append(step)
    return removed


def to_universal(ckpt_dir, tag: str) -> str:
    """Convert a (verified) tag with DeepSpeed's ds_to_universal, once; the result appears whole or not at all."""
    ckpt_dir = Path(ckpt_dir)
    out_tag = tag + UNIVERSAL_SUFFIX
    out = ckpt_dir / out_tag
    if not out.is_dir():
        check_readable(ckpt_dir / tag)  # the converter unpickles without restriction
        with files.atomic_dir(out) as tmp:
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(ckpt_dir / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
                   "--num_merge_workers", "1", "--inject_missing_state"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            # It also writes RUN/checkpoints/latest_universal naming its output; we load by explicit tag.
            (ckpt_dir / "latest_universal").unlink(missing_ok=True)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise CheckpointError(f"ds_to_universal failed on {ckpt_dir / tag}: {last}")
    check_readable(out)
    return out_tag


# ---- which tag a path names -------------------------------------------------------------------------------
def resolve_tag(path) -> Path:
    """A complete tag dir: the path itself, or the newest complete tag of a run or checkpoints dir."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if list(path.glob("*model_states.pt")) or (path / MARK).exists() or (path / SAVING).exists():
        problem = incomplete_reason(path)
        if problem:
            raise CheckpointError(f"partial checkpoint {path}: {problem}")
        return path
    ckpt_dir = checkpoints_dir(path)
    if ckpt_dir != path:  # a run dir
        RunDir(path).check_format()
    newest = newest_complete(ckpt_dir)
    tags = tag_dirs(ckpt_dir)
    if newest is None and tags:
        raise CheckpointError(f"no complete checkpoint in {ckpt_dir}: partial checkpoint {tags[-1]}: "
                              f"{incomplete_reason(tags[-1])}")
    if newest is None:
        raise CheckpointError(
            f"{path} is neither a Hugging Face directory (no config.json), a checkpoint tag dir "
            f"(no *model_states.pt) nor a run or checkpoints dir with a complete checkpoint ({MARK})")
    return newest


def fsync_own_files(tag_dir: Path, rank: int) -> None:
    """fsync the files of a tag dir that `rank` wrote (and those of no known writer), and its directories."""
    files.fsync_tree(tag_dir, keep=lambda f: _writer_rank(f) in (rank, None))


def _writer_rank(file: Path) -> int | None:
    """The rank that wrote a tag dir's file, by DeepSpeed's names (no model or pipeline parallelism here, so the
    data-parallel rank is the rank): zero_pp_rank_R_* is rank R's, mp_rank_00_model_states.pt rank 0's; None for
    any other file, which every rank then fsyncs.

    Each rank fsyncs what it wrote, since only the writing node's page cache holds it. Before, every rank fsynced
    every file: 800 ranks of a ZeRO-3 run opening and fsyncing each other's 1,600 files is 1.3M metadata calls on
    the shared filesystem per checkpoint, for nothing.
    """
    if match := re.match(r"zero_pp_rank_(\d+)_", file.name):
        return int(match.group(1))
    return 0 if re.match(r"mp_rank_\d+_model_states\.pt$", file.name) else None
