"""`python -m tests.muon_probe OUT.pt --config RECIPE --case NAME:KEY=VALUE,KEY=VALUE ... [--set KEY=VALUE ...]`:
for each case, the real Trainer (recipe -> DeepSpeed config -> optimizer -> engine) takes two updates while this
tool records, for a few parameters, the fp32 master weights before and after each update and the gradient each
update was given (summed over micro batches by tensor hooks, averaged over ranks), plus the lrs DeepSpeed's
optimizer held. tests/test_muon.py replays the updates with its own Muon and AdamW and compares.

A test tool, not part of the trainer; launch it alone or under torchrun like train. Every rank runs every case
(the gathers are collectives); rank 0 writes OUT.pt.
"""
from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist

from common import files
from train.recipe import load
from train.trainer import Trainer

WATCHED = ("transformer.h.0.mlp.c_fc.weight", "transformer.h.0.attn.c_proj.weight",
           "transformer.h.0.attn.c_attn.weight", "transformer.wte.weight", "transformer.h.0.ln_1.weight")


def fp32_master(engine, param) -> torch.Tensor:
    """The full fp32 weight the optimizer updates, whatever wrapper holds it (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param
    full = safe_get_full_fp32_param(param)
    if full is not None:
        return full.detach().float().cpu().clone()
    wrapper = engine.optimizer  # ZeRO 0 with bf16: DeepSpeed's unfused wrapper keeps one fp32 copy per parameter
    for low, high in zip(getattr(wrapper, "fp16_groups", []), getattr(wrapper, "fp32_groups", [])):
        for p, master in zip(low, high):
            if p is param:
                return master.detach().float().cpu().clone()
    return param.detach().float().cpu().clone()  # ZeRO 0 in fp32: the module's weight is the master


def probe(trainer: Trainer, updates: int) -> dict:
    trainer.build()
    engine = trainer.engine
    params = dict(engine.module.named_parameters())
    grads = {name: torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape) for name, p in params.items()}

    def hook(name):
        def add(grad):
            grads[name] += grad.detach().float().cpu()
        return add
    handles = [p.register_hook(hook(name)) for name, p in params.items()]
    steps = []
    for _ in range(updates):
        for g in grads.values():
            g.zero_()
        before = {name: fp32_master(engine, params[name]) for name in WATCHED}
        record = trainer.train_step()
        for g in grads.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
        after = {name: fp32_master(engine, params[name]) for name in WATCHED}
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values())).item()
        steps.append({"before": before, "after": after, "grad": {n: grads[n].clone() for n in WATCHED},
                      "grad_norm": norm, "lrs": list(engine.get_lr()), "record": record})
    for h in handles:
        h.remove()
    return {"steps": steps, "optimizer": type(engine.optimizer).__name__,
            "use_muon": {n: getattr(p, "use_muon", None) for n, p in params.items()},
            "recipe": trainer.recipe.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--case", action="append", default=[], help="NAME:KEY=VALUE,KEY=VALUE")
    parser.add_argument("--updates", type=int, default=2)
    args = parser.parse_args()
    results = {}
    for case in args.case:
        name, _, sets = case.partition(":")
        recipe = load(args.config, args.overrides + [s for s in sets.split(",") if s])
        trainer = Trainer(recipe)
        results[name] = probe(trainer, args.updates)
        trainer.loader.close()
        del trainer
        gc.collect()
    if dist.get_rank() == 0:
        with files.atomic_file(args.out) as f:
            torch.save(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
