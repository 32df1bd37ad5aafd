"""Weights for eval, sample and export: a checkpoint's fp32 master copy as a model.GPT, whichever way DeepSpeed
stored it (ZeRO 1-3 partitions through its zero_to_fp32, BF16_Optimizer's flat partitions, ZeRO 0's fp32 groups or
the module itself), or an HF directory.

Every file is read with checkpoints.safe_load, and a tag passes checkpoints.check_readable before DeepSpeed's own
consolidation (which unpickles without restriction) sees it.
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

from .checkpoints import (CheckpointError, _writer_rank, check_readable, rank0_states_file, resolve_tag,
                          safe_load)


# ---- weights for eval, sample and export -----------------------------------------------------------------------
def load_model(path, check=None):
    """path: an HF directory, a checkpoint tag dir, a checkpoints dir or a run dir (its newest complete tag).

    Returns (GPT in fp32 on CPU, in eval mode; meta with kind, tag, step, tokens_seen, path, zero_stage, weights).
    Weights are the fp32 master copy the optimizer keeps, not the bf16 module copy, so evaluation sees exactly
    what training would resume from. check(config), when given, sees the source's GPTConfig before any weights
    are read, and may refuse it by raising.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / "config.json").is_file():
        return _load_hf(path, check)
    model, meta = _load_deepspeed(resolve_tag(path), check)
    return model.eval(), meta


def _load_hf(path: Path, check=None):
    from common import files
    from model.config import ConfigError
    from model.gpt import GPT
    from model.hf import HFFormatError, config_from_hf
    try:
        config = config_from_hf(files.read_json(path / "config.json", HFFormatError))
        if check is not None:
            check(config)
        model = GPT.from_hf(path, config=config)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    return model.eval(), {"kind": "hf", "path": str(path), "tag": None, "step": None, "tokens_seen": None}


def _load_deepspeed(tag_dir: Path, check=None):
    from model.config import ConfigError, GPTConfig
    from model.gpt import GPT
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    if not model_files:
        raise CheckpointError(f"partial checkpoint {tag_dir}: no *model_states.pt file")
    rank0 = rank0_states_file(tag_dir)
    check_readable(tag_dir)  # zero_to_fp32 unpickles without restriction
    states = safe_load(rank0)
    if not isinstance(states.get("model_config"), dict):
        raise CheckpointError(f"{rank0} has no client_state['model_config']: not written by this project's train")
    try:
        config = GPTConfig.from_dict(states["model_config"])
    except ConfigError as exc:
        raise CheckpointError(f"{rank0}: model_config: {exc}") from None
    if check is not None:
        check(config)

    stage = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    world = int(states.get("dp_world_size", 1))
    optim_files = sorted(tag_dir.glob("*optim_states.pt"))
    if stage >= 1 and len(optim_files) != world:
        raise CheckpointError(f"partial checkpoint {tag_dir}: {len(optim_files)} of {world} "
                              f"*optim_states.pt files (ZeRO stage {stage}, {world} ranks)")
    if stage == 3 and len(model_files) != world:
        raise CheckpointError(f"partial checkpoint {tag_dir}: {len(model_files)} of {world} "
                              f"*model_states.pt files (ZeRO stage 3, {world} ranks)")

    model = GPT.empty(config)  # every weight is about to be replaced
    shapes = {name: p.shape for name, p in model.named_parameters()}
    names = states.get("param_names")
    if names is None:
        raise CheckpointError(f"{rank0} has no client_state['param_names']: not written by this version's train")
    optims = [safe_load(f)["optimizer_state_dict"] for f in sorted(optim_files, key=_rank)]
    if optims and _is_bf16_optimizer(optims[0]):
        state, source = _bf16_optimizer_state(optims, names, shapes)
    elif stage >= 1:
        state, source = _zero_fp32_state(tag_dir), "fp32 master (zero_to_fp32)"
    else:
        state, source = _stage0_state(states, names, shapes)

    if "transformer.wte.weight" in state:
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])  # tied: one fp32 master for both
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
    return _writer_rank(optim_file) or 0


def _is_bf16_optimizer(optim: dict) -> bool:
    """bf16 with fp32 gradient accumulation (ZeRO 1) uses BF16_Optimizer, whose files zero_to_fp32 rejects."""
    from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE
    return ZERO_STAGE not in optim and SINGLE_PARTITION_OF_FP32_GROUPS in optim


def _check_names(names, shapes: dict, where: str) -> list[list[str]]:
    flat = [n for group in names for n in group]
    if sorted(flat) != sorted(shapes):
        missing, extra = sorted(set(shapes) - set(flat)), sorted(set(flat) - set(shapes))
        raise CheckpointError(f"{where}: client_state param_names do not match model_config "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    return names


def _bf16_optimizer_state(optims: list[dict], names, shapes: dict) -> tuple[dict, str]:
    """BF16_Optimizer's fp32 masters: group g is one flat tensor, split evenly over the ranks (rank order), holding
    the group's parameters back to back in the trainer's order (DeepSpeed pads only at the end)."""
    import torch
    from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS
    names = _check_names(names, shapes, "BF16_Optimizer checkpoint")
    state = {}
    for g, group in enumerate(names):
        flat = torch.cat([o[SINGLE_PARTITION_OF_FP32_GROUPS][g] for o in optims])
        offset = 0
        for name in group:
            numel = math.prod(shapes[name])
            if offset + numel > flat.numel():
                raise CheckpointError(f"BF16_Optimizer checkpoint: group {g} ends before {name}")
            state[name] = flat.narrow(0, offset, numel).view(shapes[name]).float().clone()
            offset += numel
    return state, "fp32 master (BF16_Optimizer partitions, by parameter name)"


def _stage0_state(states: dict, names, shapes: dict) -> tuple[dict, str]:
    """ZeRO 0: fp32 runs train the module itself; bf16/fp16 runs keep fp32 masters in the optimizer's fp32_groups,
    one list per param group in the trainer's order, which param_names records."""
    import torch
    module = {k: v for k, v in states["module"].items() if k != "lm_head.weight"}  # tied to wte
    optimizer = states.get("optimizer")
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if not groups or all(v.dtype == torch.float32 for v in module.values()):
        state, source = {k: v.float() for k, v in module.items()}, "module"
    else:
        names = _check_names(names, shapes, "ZeRO 0 checkpoint")
        state, source = {}, "fp32 master (optimizer fp32_groups, by parameter name)"
        for g, (group_names, masters) in enumerate(zip(names, groups)):
            if len(group_names) != len(masters):
                raise CheckpointError(f"ZeRO 0 checkpoint: param group {g} has {len(masters)} fp32 masters for "
                                      f"{len(group_names)} recorded names")
            for name, master in zip(group_names, masters):
                if tuple(master.shape) != tuple(shapes[name]):
                    raise CheckpointError(f"ZeRO 0 checkpoint: the fp32 master of {name} has shape "
                                          f"{tuple(master.shape)}, model_config says {tuple(shapes[name])}")
                state[name] = master.float()
    return state, source


def _load_weights(model, state: dict, where: Path) -> None:
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
    model.load_weights({key: value.to(ours[key].dtype).contiguous() for key, value in state.items()})  # fp32
