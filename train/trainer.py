"""The training loop: one recipe -> a DeepSpeed engine over model.GPT, resumed from RUN/checkpoints if present.

Each optimizer step: set the lr from the schedule, run grad_accum micro batches (forward, backward), agree across
ranks that the loss is finite, take the update, log, then evaluate / sample / checkpoint on their cadences and stop
cleanly if any rank got SIGUSR1 or SIGTERM (save, exit PREEMPTED_EXIT).
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from common import tokenizer
from common.errors import PipelineError
from model.gpt import GPT
from prep.reader import Dataset

from . import checkpoint as ckpt
from . import launch
from .config import batch_plan, deepspeed_config, model_config, startup_table, zero_stage
from .data import TrainLoader, val_batches
from .metrics import RunLog, mfu, peak_flops, peak_memory_mb
from .schedule import learning_rate
from .stop import StopFlag

PREEMPTED_EXIT = 99  # Slurm scripts requeue the job on this status (contract C3)


class TrainError(PipelineError):
    """A run that cannot start or continue; the message says why."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (dim >= 2) only; biases and LayerNorm gains are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def rng_state(device: str) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: str) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.startswith("cuda") and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_inputs(recipe: dict, dataset: Dataset) -> None:
    config = model_config(recipe)
    if dataset.n_vocab > config.vocab_size:
        raise TrainError(f"dataset {dataset.path} has vocabulary {dataset.n_vocab} but the model's vocab_size is "
                         f"{config.vocab_size}; set model.vocab_size to {dataset.n_vocab}")
    if dataset.n_vocab != config.vocab_size:
        raise TrainError(f"vocabulary mismatch: dataset {dataset.path} has n_vocab {dataset.n_vocab}, the model "
                         f"vocab_size {config.vocab_size}")
    if not dataset.split("train"):
        raise TrainError(f"dataset {dataset.path} has no train shards")


def resume_point(ckpt_dir: Path, recipe: dict) -> tuple[str | None, dict | None]:
    """The newest complete tag and its client_state; refuses a checkpoint of another model shape."""
    tag = ckpt.latest_tag(ckpt_dir)
    if tag is None:
        return None, None
    state = ckpt.read_client_state(ckpt_dir / tag)
    want = model_config(recipe).to_dict()
    if state["model_config"] != want:
        diff = ", ".join(f"{k}: checkpoint {state['model_config'].get(k)!r} vs recipe {v!r}"
                         for k, v in want.items() if state["model_config"].get(k) != v)
        raise TrainError(f"{ckpt_dir / tag} holds a model of another shape ({diff}); "
                         f"use a new run_dir or the matching model section")
    return tag, state


class Trainer:
    def __init__(self, recipe: dict):
        self.recipe = recipe
        self.place = launch.setup()
        self.is_main = self.place.rank == 0
        self.plan = batch_plan(recipe, self.place.world_size)
        self.dataset = Dataset(recipe["data"]["dir"])
        check_inputs(recipe, self.dataset)
        self.model_config = model_config(recipe)
        self.ds_config = deepspeed_config(recipe, self.plan)
        self.run_dir = Path(recipe["run_dir"])
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.resume_tag, self.resume_state = resume_point(self.ckpt_dir, recipe)
        saved_world = (self.resume_state or {}).get("world_size", self.place.world_size)
        # ZeRO partitions optimizer state by rank; without ZeRO it sits whole in the model-states file.
        self.universal = (self.resume_tag is not None and saved_world != self.place.world_size
                          and zero_stage(self.ds_config) > 0)
        if self.universal:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        # Built before any collective so a bad recipe or dataset fails on every rank alike, with nothing written.
        self.loader = TrainLoader(self.dataset, self.plan.micro_batch, self.plan.seq_len, self.place.rank,
                                  self.place.world_size, recipe["seed"])
        self.val = val_batches(self.dataset, self.plan.micro_batch, self.plan.seq_len, self.place.rank,
                               self.place.world_size, recipe["eval"]["val_batches"])
        self.peak = peak_flops(recipe["mfu"], self.place.device)
        # Tokenize the sample prompt now: a missing BPE cache should stop the run before step 0, not at step N.
        self.prompt_tokens = tokenizer.encode(recipe["sample"]["prompt"]) if recipe["sample"]["every"] else None

    # ---- setup -------------------------------------------------------------------------------------------------
    def build(self) -> None:
        import deepspeed
        deepspeed.init_distributed(dist_backend=self.place.backend)
        torch.manual_seed(self.recipe["seed"])  # identical initial weights on every rank
        model = GPT(self.model_config)
        model.activation_checkpointing = self.recipe["activation_checkpointing"]
        self.n_params = model.num_params()
        o = self.recipe["optim"]
        groups = param_groups(model, o["weight_decay"])
        offload = self.ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if offload in ("cpu", "nvme"):
            # DeepSpeed's vectorised CPU AdamW: what ZeRO-Offload expects (torch's AdamW would be refused).
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            self.optimizer = DeepSpeedCPUAdam(groups, lr=o["max_lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                              adamw_mode=True)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=o["max_lr"], betas=tuple(o["betas"]), eps=o["eps"])
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        if self.recipe["compile"]:
            # nn.Module.compile in place (what engine.compile calls): the module stays a GPT with its own
            # parameter names, so checkpoints keep their keys. Compilation itself happens in the first forward;
            # validation (eval, no grad) gets a second graph; generate() calls GPT.features, not the module, so
            # sampling runs uncompiled and its growing prompt lengths cause no recompiles.
            self.engine.compile()
        self.step, self.tokens_seen = 0, 0
        if self.resume_tag is not None:
            self._load()

    def _load(self) -> None:
        tag = self.resume_tag
        if self.universal:
            if self.is_main:
                ckpt.to_universal(self.ckpt_dir, tag)
            dist.barrier()
            tag = tag + ckpt.UNIVERSAL_SUFFIX
        path, state = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise TrainError(f"DeepSpeed could not load {self.ckpt_dir / tag}")
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.loader.load_state_dict(state["loader"])
        rng = state.get("rng") or []
        if not self.universal and len(rng) == self.place.world_size:
            set_rng_state(rng[self.place.rank], self.place.device)
        else:
            torch.manual_seed(self.recipe["seed"] + self.step + self.place.rank)
        self.resumed_from = tag

    # ---- pieces of a step ----------------------------------------------------------------------------------------
    def _all_mean(self, value: torch.Tensor) -> float:
        value = value.detach().float().reshape(1).to(self.engine.device)
        dist.all_reduce(value)
        return value.item() / self.place.world_size

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        try:
            return self.engine(x.to(self.engine.device), y.to(self.engine.device))[1]
        except RuntimeError as exc:
            # With compile on, the first forward of each mode compiles: a missing C++ compiler (CPU) or Triton
            # (GPU) shows up here, not at start-up.
            from torch._dynamo.exc import BackendCompilerFailed
            if not isinstance(exc, BackendCompilerFailed):
                raise
            raise TrainError(f"torch.compile failed in update {self.step + 1} "
                             f"({str(exc).strip().splitlines()[0]}); fix that or set compile: false") from None

    def train_step(self) -> dict:
        lr = learning_rate(self.step, self.recipe["optim"]["max_lr"], self.recipe["optim"]["min_lr_ratio"],
                           self.recipe["optim"]["warmup_steps"], self.plan.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.engine.device)
        for micro in range(self.plan.grad_accum):
            loss = self._forward(*self.loader.next())
            self.engine.backward(loss)
            loss_sum += loss.detach().float()
            if micro == self.plan.grad_accum - 1:
                mean_loss = self._all_mean(loss_sum / self.plan.grad_accum)
                if not math.isfinite(mean_loss):
                    raise TrainError(f"loss is {mean_loss} in update {self.step + 1} (after step {self.step}); stopped before it "
                                     f"(last good checkpoint: {ckpt.latest_tag(self.ckpt_dir) or 'none'})")
            self.engine.step()
        if self.place.device.startswith("cuda"):
            torch.cuda.synchronize()
        step_time = time.perf_counter() - started
        self.step += 1
        self.tokens_seen += self.plan.total_tokens
        grad_norm = self.engine.get_global_grad_norm()
        tokens_per_s = self.plan.total_tokens / step_time
        return {"step": self.step, "loss": mean_loss, "lr": self.engine.get_lr()[0],
                "grad_norm": None if grad_norm is None else float(grad_norm), "tokens": self.tokens_seen,
                "tokens_per_s": tokens_per_s, "step_time_s": step_time,
                "mfu": mfu(tokens_per_s, self.model_config, self.plan.seq_len, self.place.world_size, self.peak),
                "peak_mem_mb": peak_memory_mb(self.place.device)}

    @torch.no_grad()
    def validate(self) -> float:
        self.engine.eval()
        total = torch.zeros((), device=self.engine.device)
        for x, y in self.val:
            total += self._forward(x, y).float()
        self.engine.train()
        return self._all_mean(total / len(self.val))

    @torch.no_grad()
    def sample(self) -> list[str]:
        # Every rank generates (ZeRO-3 gathers parameters collectively in forward); rank 0 records the text.
        s = self.recipe["sample"]
        prompt = torch.tensor([self.prompt_tokens] * s["num"], device=self.engine.device)
        generator = torch.Generator(device=self.engine.device).manual_seed(self.recipe["seed"] + self.step)
        self.engine.eval()
        out = self.engine.module.generate(prompt, s["max_new_tokens"], top_k=50, generator=generator)
        self.engine.train()
        return [tokenizer.decode(row[prompt.size(1):].tolist()) for row in out]

    def save(self) -> None:
        states = [None] * self.place.world_size
        dist.all_gather_object(states, rng_state(self.place.device))
        client_state = {"model_config": self.model_config.to_dict(), "config": self.recipe, "step": self.step,
                        "tokens_seen": self.tokens_seen, "loader": self.loader.state_dict(), "rng": states,
                        "world_size": self.place.world_size}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=ckpt.tag_for(self.step), client_state=client_state)
        dist.barrier()
        if self.is_main:
            c = self.recipe["checkpoint"]
            ckpt.rotate(self.ckpt_dir, c["keep_last"], c["keep_every"])
        dist.barrier()

    def export_live_fp32(self) -> None:
        """The fp32 master weights as the optimizer holds them now, for auditing checkpoint consolidation."""
        from deepspeed.utils import safe_get_full_fp32_param
        weights = {}
        for name, p in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            weights[name] = (p.detach() if full is None else full).float().cpu().clone()
        if self.is_main:
            path = self.run_dir / f"live_fp32_step{self.step}.pt"
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save(weights, tmp)
            os.replace(tmp, path)

    # ---- the loop ------------------------------------------------------------------------------------------------
    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.engine.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item() > 0

    def run(self, stop: StopFlag) -> int:
        done = (self.resume_state or {}).get("step", 0)
        if done >= self.plan.max_steps:
            if self.is_main:
                print(f"run already complete: step {done} of {self.plan.max_steps}", flush=True)
            return 0
        self.build()
        r = self.recipe
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "config.yaml", yaml.safe_dump(r, sort_keys=False))
            print(startup_table(r, self.plan, self.ds_config, self.n_params, compiled=self.engine.is_compiled,
                                checkpointing=self.engine.module.activation_checkpointing), flush=True)
            if self.resume_tag:
                print(f"resuming from {self.ckpt_dir / self.resumed_from} at step {self.step}", flush=True)
        log = RunLog(self.run_dir, r["log"]["tensorboard"]) if self.is_main else None
        bar = tqdm(total=self.plan.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.is_main, file=sys.stderr)
        try:
            while self.step < self.plan.max_steps:
                record = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if log and (record["step"] % r["log"]["every"] == 0 or self.step == self.plan.max_steps):
                    log.write(record)
                last = self.step == self.plan.max_steps
                if r["eval"]["every"] and (self.step % r["eval"]["every"] == 0 or last):
                    val_loss = self.validate()
                    if log:
                        log.write({"step": self.step, "val_loss": val_loss})
                if r["sample"]["every"] and (self.step % r["sample"]["every"] == 0 or last):
                    texts = self.sample()
                    if log:
                        log.write_samples(self.step, r["sample"]["prompt"], texts)
                preempted = self._any_rank(stop.signal is not None)
                if last or preempted or (r["checkpoint"]["every"] and self.step % r["checkpoint"]["every"] == 0):
                    self.save()
                if preempted and not last:
                    if self.is_main:
                        print(f"preempted ({stop.signal or 'signal on another rank'}): saved "
                              f"{ckpt.tag_for(self.step)}, exiting with status {PREEMPTED_EXIT}", flush=True)
                    return PREEMPTED_EXIT
            if r["checkpoint"]["export_live_fp32"]:
                self.export_live_fp32()
            return 0
        finally:
            bar.close()
            if log:
                log.close()
