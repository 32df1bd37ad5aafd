"""load_model(path): a GPT from a Hugging Face directory or a DeepSpeed training checkpoint (any ZeRO stage).

A training checkpoint is whatever train/ wrote with engine.save_checkpoint(RUN/checkpoints, tag, client_state)
(contract C3). Its weights are rebuilt from the fp32 master copy the optimizer keeps, not from the bf16 module
copy, so evaluation sees exactly what training would resume from.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

from common.errors import PipelineError

from .config import ConfigError, GPTConfig
from .gpt import GPT


class CheckpointError(PipelineError):
    """A path that does not hold a loadable model; the message says what is wrong and where."""


def load_model(path) -> tuple[GPT, dict]:
    """path: an HF directory, a DeepSpeed tag dir, a checkpoints dir (follows `latest`) or a run dir.

    Returns (GPT in fp32 on CPU, in eval mode; meta with kind, tag, step, tokens_seen, path).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / "config.json").is_file():
        return _load_hf(path)
    model, meta = _load_deepspeed(_tag_dir(path))
    return model.eval(), meta


def _load_hf(path: Path) -> tuple[GPT, dict]:
    try:
        model = GPT.from_hf(path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    return model.eval(), {"kind": "hf", "path": str(path), "tag": None, "step": None, "tokens_seen": None}


def _tag_dir(path: Path) -> Path:
    """Resolve a run dir or checkpoints dir to the tag dir its `latest` file names."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if list(path.glob("*model_states.pt")):
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    latest = path / "latest"
    if not latest.is_file():
        raise CheckpointError(
            f"{path} is neither a Hugging Face directory (no config.json), a checkpoint tag dir "
            f"(no *model_states.pt) nor a checkpoints dir with a `latest` file")
    tag = latest.read_text().strip()
    tag_dir = path / tag
    if not tag or not tag_dir.is_dir():
        raise CheckpointError(f"{latest} names tag {tag!r} but {tag_dir} does not exist")
    return tag_dir


def _load_deepspeed(tag_dir: Path) -> tuple[GPT, dict]:
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    if not model_files:
        raise CheckpointError(f"partial checkpoint {tag_dir}: no *model_states.pt file")
    # Rank 0's file carries client_state; stage 3 names it zero_pp_rank_0_mp_rank_00_model_states.pt.
    rank0 = next((f for f in model_files if f.name in ("mp_rank_00_model_states.pt",
                                                        "zero_pp_rank_0_mp_rank_00_model_states.pt")), None)
    if rank0 is None:
        raise CheckpointError(f"partial checkpoint {tag_dir}: rank 0's model states file is missing")
    try:
        states = torch.load(rank0, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # truncated or foreign file: torch raises several kinds
        raise CheckpointError(f"cannot read {rank0}: {type(exc).__name__}: {exc}") from None
    if not isinstance(states.get("model_config"), dict):
        raise CheckpointError(f"{rank0} has no client_state['model_config']: not written by this project's train")
    try:
        config = GPTConfig.from_dict(states["model_config"])
    except ConfigError as exc:
        raise CheckpointError(f"{rank0}: model_config: {exc}") from None

    stage = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    world = int(states.get("dp_world_size", 1))
    optim_files = sorted(tag_dir.glob("*optim_states.pt"))
    if stage >= 1 and len(optim_files) != world:
        raise CheckpointError(f"partial checkpoint {tag_dir}: {len(optim_files)} of {world} "
                              f"*optim_states.pt files (ZeRO stage {stage}, {world} ranks)")
    if stage == 3 and len(model_files) != world:
        raise CheckpointError(f"partial checkpoint {tag_dir}: {len(model_files)} of {world} "
                              f"*model_states.pt files (ZeRO stage 3, {world} ranks)")

    if optim_files and _is_bf16_optimizer(optim_files[0]):
        state, source = _bf16_optimizer_state(optim_files, states), "fp32 master (BF16_Optimizer partitions)"
    elif stage >= 1:
        state, source = _zero_fp32_state(tag_dir), "fp32 master (zero_to_fp32)"
    else:
        state, source = _stage0_state(states)

    model = GPT(config)
    _load_weights(model, state, tag_dir)
    meta = {"kind": "deepspeed", "path": str(tag_dir), "tag": tag_dir.name,
            "step": states.get("step"), "tokens_seen": states.get("tokens_seen"),
            "zero_stage": stage, "weights": source, "config": states.get("config")}
    return model, meta


def _zero_fp32_state(tag_dir: Path) -> dict:
    """DeepSpeed's own consolidation of the ZeRO-partitioned fp32 master weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it narrates to stdout; samples go there
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise CheckpointError(f"cannot consolidate ZeRO checkpoint {tag_dir}: {exc}") from None


def _rank(optim_file: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", optim_file.name)
    return int(match.group(1)) if match else 0


def _is_bf16_optimizer(optim_file: Path) -> bool:
    """bf16 with fp32 gradient accumulation (ZeRO 1) uses BF16_Optimizer, whose files zero_to_fp32 rejects."""
    optim = torch.load(optim_file, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
    return "zero_stage" not in optim and "param_slice_mappings" in optim


def _bf16_optimizer_state(optim_files: list[Path], states: dict) -> dict:
    """Reassemble BF16_Optimizer's fp32 partitions: each rank maps parameter names to slices of its flat partition."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for optim_file in sorted(optim_files, key=_rank):
        optim = torch.load(optim_file, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
        for flat, mapping in zip(optim["single_partition_of_fp32_groups"], optim["param_slice_mappings"]):
            for name, address in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, address.start, address.numel))
    state = {}
    for group in states.get("param_shapes") or []:
        for name, shape in group.items():
            full = torch.cat(pieces.get(name, []) or [torch.empty(0)])
            if full.numel() != shape.numel():
                raise CheckpointError(f"BF16_Optimizer checkpoint: {name} has {full.numel()} of {shape.numel()} values")
            state[name] = full.view(shape).float().clone()
    for alias, owner in (states.get("shared_params") or {}).items():
        state[alias] = state[owner]
    return state


def _stage0_state(states: dict) -> tuple[dict, str]:
    """ZeRO 0: fp32 runs train the module itself; bf16/fp16 runs keep fp32 masters in the optimizer's fp32_groups.

    ZeRO 0 saves no parameter names for those masters (only their order in the optimizer's param groups, which
    train/ chooses), so each master is matched to the one module weight it rounds to: DeepSpeed copies
    master -> module after every step, so the low-precision weight equals the master cast down.
    """
    module = {k: v for k, v in states["module"].items() if k != "lm_head.weight"}  # tied to wte
    optimizer = states.get("optimizer")
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if not groups or all(v.dtype == torch.float32 for v in module.values()):
        state, source = {k: v.float() for k, v in module.items()}, "module"
    else:
        state, source = {}, "fp32 master (optimizer fp32_groups)"
        for master in (t for group in groups for t in group):
            name = next((k for k, v in module.items() if k not in state and v.shape == master.shape
                         and torch.equal(master.to(v.dtype), v)), None)
            if name is None:
                raise CheckpointError(f"ZeRO 0 checkpoint: an fp32 master of shape {tuple(master.shape)} "
                                      f"matches no module weight")
            state[name] = master.float()
        if len(state) != len(module):
            raise CheckpointError(f"ZeRO 0 checkpoint: {len(state)} fp32 masters for {len(module)} module weights")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state, source


def _load_weights(model: GPT, state: dict, where: Path) -> None:
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    extra = sorted(set(state) - set(ours))
    if missing or extra:
        raise CheckpointError(f"{where}: weights do not match model_config: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for key, value in state.items():
        if value.shape != ours[key].shape:
            raise CheckpointError(f"{where}: {key} has shape {tuple(value.shape)}, model_config expects "
                                  f"{tuple(ours[key].shape)}")
    model.load_state_dict(state)
