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
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

import torch

from common.errors import PipelineError

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
        # On CUDA torch's fused kernel: one launch updates every tensor (the default, foreach, launches several
        # per parameter group step). DeepSpeed's ZeRO 0-3 without offload call this optimizer's step() on GPU
        # tensors (fp32 master weights, or the bf16 weights themselves), all of which the fused kernel takes; not
        # measured on a GPU yet (docs/benchmarks.md). None elsewhere: torch's default on the CPU.
        fused = True if device.startswith("cuda") else None
        optimizer = torch.optim.AdamW(groups, lr=0.0, betas=optim.betas, eps=optim.eps, fused=fused)
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
