"""The optimizer the trainer hands to deepspeed.initialize, built from the recipe's optim section.

adamw (the default): torch's AdamW on every parameter (DeepSpeedCPUAdam under optimizer offload); weight decay on
matrices and embeddings (dim >= 2), none on biases and LayerNorm gains.

muon: Muon (momentum orthogonalised by a Newton-Schulz iteration) on the weight matrices of the transformer
blocks (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) and AdamW on everything else: wte (and so the lm_head tied
to it), wpe, biases, LayerNorm gains. The grouping is ours: this module sets `use_muon` on every parameter, which
is what DeepSpeed's ZeRO and BF16 optimizers read. DeepSpeed's own guess (deepspeed.set_optimizer_flags: every
parameter of 2 or more dimensions whose name lacks "embed" and "lm_head" -- for GPT-2's names that is wte and wpe
too) runs only for an optimizer named in the DeepSpeed JSON, which train.recipe refuses; check_grouping confirms
after deepspeed.initialize that the flags are still ours.

The optimizer is DeepSpeed's MuonWithAuxAdam, the class its ZeRO 1-3 and BF16 paths recognise, with torch's
AdamW as the auxiliary optimizer of the non-Muon groups (the same AdamW an adamw run uses). DeepSpeed 0.19.8 wraps
Muon's update (muon_update, both Newton-Schulz iterations) in torch.compile whatever the recipe's `compile` says,
so a muon run needs inductor's toolchain: muon_compile_problem checks it before the engine is built.

The recipe's optim section (Optim) is defined and checked here, with the rules for Muon under each DeepSpeed
configuration (check_deepspeed). torch is imported where it is used, so reading a recipe does not load it.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.errors import PipelineError

from .section import RecipeError, choice, integer, is_number, number, shown

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("adamw", "muon")

# Upper bounds no published recipe comes near, so that only a typo or a value meant for another key is refused
# (optim.max_lr=1e300 started a run that diverged at its first update and stopped after five skipped ones):
# - a peak lr: GPT-2 recipes use 6e-4, Muon 0.02-0.05, modded-nanogpt's Adam on embeddings up to ~0.6; 10 is 15x that.
# - decoupled weight decay (each update scales a weight by 1 - lr x weight_decay): 0.1 in GPT-2/GPT-3/llm.c, 0 in
#   modded-nanogpt, 1.0 the largest in published work (grokking experiments); 10 is 10x that.
# - eps: 1e-10 (modded-nanogpt) to 1e-6; GPT-2's per-element gradients are ~1e-4 (a norm of ~1 over 1e8 weights),
#   so at 1e-3 eps already outweighs sqrt(v) and Adam is plain SGD at lr / eps. Its floor is not 0: at 0 a weight
#   whose gradient is exactly zero (a position past seq_len, a padded embedding row) is 0 / 0 = NaN after its first
#   update; 1e-30 is still non-zero in fp32 and bf16.
# - grad_clip: 1.0 in every GPT-2 recipe, 0.3-5 elsewhere; a clip at a norm of 100 never acts on a healthy update,
#   and 0 (not a large number) turns clipping off.
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 10.0
EPS_RANGE = (1e-30, 1e-3)
MAX_GRAD_CLIP = 100.0


@dataclass(frozen=True)
class Optim:
    """The recipe's optim section. adamw: AdamW on every parameter. muon: Muon on the transformer blocks' weight
    matrices and AdamW (max_lr, betas, eps, weight_decay) on the rest: embeddings, biases, gains."""
    name: str = "adamw"
    max_lr: float = 6.0e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1.0e-8
    grad_clip: float = 1.0
    # Muon's peak lr, momentum (Nesterov) and decoupled weight decay: modded-nanogpt's Muon record of 2024-10-29.
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0

    def check(self) -> None:
        choice("optim.name", self.name, OPTIMIZERS)
        for key, high in (("max_lr", MAX_LR), ("muon_lr", MAX_LR), ("weight_decay", MAX_WEIGHT_DECAY),
                          ("muon_weight_decay", MAX_WEIGHT_DECAY)):
            number(f"optim.{key}", getattr(self, key), high=high, what=f"a non-negative number, at most {high:g}")
        number("optim.grad_clip", self.grad_clip, high=MAX_GRAD_CLIP,
               what=f"a non-negative number (0: no clipping), at most {MAX_GRAD_CLIP:g}")
        low, high = EPS_RANGE
        number("optim.eps", self.eps, low, high, what=f"a number in [{low:g}, {high:g}]")
        number("optim.min_lr_ratio", self.min_lr_ratio)
        if self.min_lr_ratio > 1:
            raise RecipeError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        integer("optim.warmup_steps", self.warmup_steps, low=0)
        betas = self.betas
        if not (isinstance(betas, tuple) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
            raise RecipeError(f"optim.betas must be two numbers in [0, 1), got {shown(betas)}")
        if not (is_number(self.muon_momentum) and 0 <= self.muon_momentum < 1):
            raise RecipeError(f"optim.muon_momentum must be a number in [0, 1), got {shown(self.muon_momentum)}")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def optimizer_offload(ds_config: dict) -> bool:
    """The DeepSpeed config keeps optimizer state in CPU memory or on NVMe (ZeRO-Offload)."""
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def bf16_optimizer(ds_config: dict) -> bool:
    """DeepSpeed 0.19.8 wraps the optimizer in its BF16_Optimizer: bf16 with fp32 gradient accumulation at ZeRO 1."""
    accum = ds_config.get("data_types", {}).get("grad_accum_dtype")
    return (ds_config.get("bf16", {}).get("enabled", False) and accum in ("fp32", "float32")
            and zero_stage(ds_config) == 1 and not optimizer_offload(ds_config))


def check_deepspeed(optim: Optim, precision: str, ds: dict, path) -> None:
    """Refuse, in one line each, the combinations with Muon that DeepSpeed 0.19.8 runs other than as Muon + AdamW
    (each checked by tests/test_muon.py against a reference; docs/train.md, Choosing an optimizer). `ds`: the
    filled-in DeepSpeed config from `path`; ZeRO-3's reduce_scatter is set off in it for Muon."""
    if optim.name != "muon":
        return
    stage = zero_stage(ds)
    where = f"optim.name muon with {path} (ZeRO stage {stage}, {precision})"
    if optimizer_offload(ds):
        raise RecipeError(f"{where}: optimizer offload is not supported with Muon here (its CPU path is untested); "
                          f"use a config without offload_optimizer")
    if stage == 0 and precision == "bf16":
        # Its wrapper for ZeRO 0 bf16 takes one optimizer step on zero gradients at start-up. For AdamW the
        # trainer undoes it (forget_start_up_step, tested); with Muon's mixed groups that is untested.
        raise RecipeError(f"{where}: DeepSpeed's ZeRO-0 bf16 wrapper takes a dummy optimizer step at start-up, "
                          f"which is undone for AdamW only; use ZeRO 1 (configs/deepspeed/zero1.json) or fp32")
    if optim.grad_clip > 0 and stage > 0 and not bf16_optimizer(ds):
        # There the Muon update is written into the gradient partitions before the norm is taken: the clip scales
        # the orthogonalised update by grad_clip / (norm of updates and gradients) -- 0.025x in the tests.
        raise RecipeError(f"{where}: DeepSpeed clips Muon's orthogonalised update here, not the gradient, which "
                          f"shrinks every Muon step; set optim.grad_clip=0, or use bf16 with "
                          f"data_types.grad_accum_dtype fp32 at ZeRO 1 (configs/deepspeed/zero1.json), which clips "
                          f"the gradient first")
    if stage == 3:
        if ds["zero_optimization"].get("reduce_scatter", False):
            raise RecipeError(f"{where}: DeepSpeed's ZeRO-3 Muon needs zero_optimization.reduce_scatter false; "
                              f"remove it from the JSON or set it false")
        ds["zero_optimization"]["reduce_scatter"] = False  # its default is true, which ZeRO-3 Muon refuses

# Newton-Schulz variant for DeepSpeed's muon_update: "gram" (its default) iterates on the small Gram matrix, the
# same quintic polynomial as the "standard" iteration, in fp16 where the device supports it, else fp32.
NS_METHOD = "gram"
MUON_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GroupingError(PipelineError):
    """The parameters' Muon/AdamW assignment is not the one this module made."""


class ToolchainError(PipelineError):
    """torch.compile cannot build kernels here, and DeepSpeed's Muon update is compiled."""


def _probe(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1  # pointwise: inductor generates (and must compile) a kernel for it, C++ or Triton


def muon_compile_problem(device: str) -> str | None:
    """None if torch.compile builds a kernel on `device`; else one line saying what failed and what to do.

    Without a compiler the first Muon update dies inside DeepSpeed (in backward at ZeRO 1-2, where it
    orthogonalises gradient partitions; in step otherwise) with an inductor traceback. A trivial function
    compiled here goes through the same toolchain (inductor's C++ compiler on a CPU; Triton, which builds its
    launcher with a C compiler, on a GPU) before any engine exists, and leaves Muon's own compiled code alone.
    Any exception counts: nothing in compiling x * 2 + 1 can fail but the toolchain.
    """
    import torch
    try:
        torch.compile(_probe, dynamic=False)(torch.ones(8, device=device))
    except Exception as exc:  # noqa: BLE001 -- see the docstring
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        needs = "a working C++ compiler (g++ on PATH, or CXX)" if device == "cpu" else \
            "Triton and a working C compiler (gcc on PATH, or CC)"
        return (f"optim.name muon: DeepSpeed compiles Muon's update with torch.compile, which cannot build kernels "
                f"on {device} of {socket.gethostname()} ({first}); it needs {needs} on every node, e.g. "
                f"`module load gcc` in SITE_ENV_SETUP, or set TORCHDYNAMO_DISABLE=1 to run it uncompiled "
                f"(slower), or use optim.name adamw")
    return None


def uses_muon(name: str) -> bool:
    """A weight matrix of a transformer block: the parameters Muon trains in a muon run."""
    return name.startswith("transformer.h.") and name.endswith(MUON_MATRICES)


@dataclass
class Built:
    optimizer: torch.optim.Optimizer
    peak_lrs: list[float]          # per param group, in order: the lr the schedule's multiplier scales
    param_names: list[list[str]]   # per param group, in the optimizer's order (checkpoints record it)
    hyperparameters: list[dict]    # per param group, in that order: the recipe's options other than lr


# The options a param group takes from the recipe (lr comes from the schedule before each update).
RECIPE_OPTIONS = ("weight_decay", "betas", "eps", "momentum")


def param_groups(model: torch.nn.Module, optim) -> list[dict]:
    """The param groups for the recipe's optim section, each with "names" beside "params", empty groups left out.

    AdamW groups come first (group 0 is the decayed AdamW group in both runs: its lr is the one logged as `lr`);
    with muon the Muon group is last."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = optim.name == "muon"
    hidden = [(n, p) for n, p in named if muon and uses_muon(n)]
    rest = [(n, p) for n, p in named if not (muon and uses_muon(n))]
    groups = [{"named": [(n, p) for n, p in rest if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"named": [(n, p) for n, p in rest if p.dim() < 2], "weight_decay": 0.0}]
    if muon:
        for group in groups:
            group.update(use_muon=False, lr=optim.max_lr, betas=tuple(optim.betas), eps=optim.eps)
        groups.append({"named": hidden, "use_muon": True, "lr": optim.muon_lr, "momentum": optim.muon_momentum,
                       "weight_decay": optim.muon_weight_decay, "ns_method": NS_METHOD})
    out = []
    for group in groups:
        named_params = group.pop("named")
        if named_params:
            out.append({"params": [p for _, p in named_params], "names": [n for n, _ in named_params], **group})
    return out


def build(model: torch.nn.Module, optim, device: str, offload: bool) -> Built:
    """The optimizer over model's parameters; `offload`: the DeepSpeed config offloads optimizer state."""
    import torch
    groups = param_groups(model, optim)
    name_of = {id(p): n for group in groups for n, p in zip(group.pop("names"), group["params"])}
    peak_lrs = [group.get("lr", optim.max_lr) for group in groups]
    # Built at lr 0: set_lr gives every group its lr before each update, and DeepSpeed's ZeRO-0 bf16 wrapper takes
    # one optimizer step on zero gradients at start-up, which at a real lr would decay every weight once.
    for group in groups:
        group["lr"] = 0.0
    if optim.name == "muon":
        for name, p in model.named_parameters():
            p.use_muon = uses_muon(name)
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
        fused = True if device.startswith("cuda") else None
        optimizer = MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW,
                                    adam_optimizer_kwargs={"fused": fused})
    elif offload:
        # DeepSpeed's vectorised CPU AdamW: what ZeRO-Offload expects (torch's AdamW would be refused).
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        optimizer = DeepSpeedCPUAdam(groups, lr=0.0, betas=optim.betas, eps=optim.eps, adamw_mode=True)
    else:
        # torch's fused kernel, on CUDA and CPU alike: one pass over each tensor updates it (the defaults launch
        # several kernels per group on CUDA, and on the CPU run about ten whole-tensor passes per tensor, which
        # for ZeRO's one flat fp32 partition cost 7x the fused step: docs/benchmarks.md). DeepSpeed's ZeRO 0-3
        # without offload call this optimizer's step() on fp32 master weights or the bf16 weights themselves,
        # all of which the fused kernel takes.
        optimizer = torch.optim.AdamW(groups, lr=0.0, betas=optim.betas, eps=optim.eps, fused=True)
    # MuonWithAuxAdam sorts its Muon group by size: the names follow the optimizer's own order.
    names = [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    options = [{k: group[k] for k in RECIPE_OPTIONS if k in group} for group in optimizer.param_groups]
    return Built(optimizer, peak_lrs, names, options)


def restore_hyperparameters(optimizer: torch.optim.Optimizer, hyperparameters: list[dict]) -> None:
    """After a checkpoint load: each param group's options as the recipe says, not as the checkpoint saved them.

    torch's Optimizer.load_state_dict (which DeepSpeed calls at every ZeRO stage) takes every option of the saved
    groups, so a change a resume allowed with --allow-change (optim.weight_decay, betas, eps, muon_momentum,
    muon_weight_decay) would otherwise be recorded in recipe_history.jsonl and silently not applied. In place:
    MuonWithAuxAdam's auxiliary AdamW shares these group dicts.
    """
    if len(optimizer.param_groups) != len(hyperparameters):
        raise RuntimeError(f"{len(optimizer.param_groups)} param groups for {len(hyperparameters)} option sets")
    for group, options in zip(optimizer.param_groups, hyperparameters):
        group.update(options)


def forget_start_up_step(optimizer: torch.optim.Optimizer, zero_stage: int, bf16: bool) -> None:
    """After deepspeed.initialize: drop the state of the start-up step DeepSpeed's ZeRO-0 bf16 wrapper takes.

    That step on zero gradients (its initialize_optimizer_states) leaves AdamW's step count at 1, so the first real
    update would use the second step's bias correction (0.73x the first update); with no state the first real
    update is step 1, as in an fp32 or ZeRO 1-3 run. ZeRO 1-3 take no such step and may link state at start-up.
    """
    if zero_stage == 0 and bf16:
        optimizer.state.clear()


def check_grouping(model: torch.nn.Module, optim) -> None:
    """After deepspeed.initialize: every parameter still carries the use_muon flag build() gave it."""
    if optim.name != "muon":
        return
    wrong = [n for n, p in model.named_parameters() if getattr(p, "use_muon", None) is not uses_muon(n)]
    if wrong:
        raise GroupingError(f"optim.name muon: DeepSpeed changed the Muon/AdamW assignment of {len(wrong)} "
                            f"parameters ({', '.join(wrong[:3])}); is an optimizer named in the DeepSpeed JSON?")


def set_lr(optimizer: torch.optim.Optimizer, peak_lrs: list[float], multiplier: float) -> None:
    """Each param group's lr = its peak lr x the schedule's multiplier."""
    if len(optimizer.param_groups) != len(peak_lrs):
        raise RuntimeError(f"{len(optimizer.param_groups)} param groups for {len(peak_lrs)} peak lrs")
    for group, peak in zip(optimizer.param_groups, peak_lrs):
        group["lr"] = peak * multiplier
