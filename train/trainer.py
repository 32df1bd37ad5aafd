"""The training loop: one recipe -> a DeepSpeed engine over model.GPT, resumed from RUN/checkpoints if present.

Each optimizer step: set the lr from the schedule, run grad_accum micro batches (forward, backward), agree across
ranks that the loss is finite, take the update, log, then evaluate / sample / checkpoint on their cadences and stop
cleanly if any rank got SIGUSR1 or SIGTERM (save, exit PREEMPTED_EXIT).
"""
from __future__ import annotations

import contextlib
import random
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common import tokenizer
from common.device import reuse_freed_cpu_memory
from common.errors import PipelineError
from model.gpt import GPT
from prep.reader import Dataset

from . import heal, launch, optim, paths, rundir, wandb_log, warm_start, watchdog, writer
from .data import open_sources, train_loader, val_batches
from .metrics import RunLog, mfu, peak_flops, peak_memory_mb
from .optim import optimizer_offload, zero_stage
from .recipe import (Recipe, RecipeError, batch_plan, check_allowed_keys, check_resume, deepspeed_config,
                     schedule_shape, startup_table)
from .rundir import checkpoints as ckpt
from .schedule import lr_multiplier
from .stop import StopFlag

PREEMPTED_EXIT = 99  # the train stage (slurm/stage.py) requeues the job on this status (docs/design.md, exit status)


class TrainError(PipelineError):
    """A run that cannot start or continue; the message says why."""


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


def check_inputs(recipe: Recipe, dataset: Dataset) -> None:
    config = recipe.model
    if dataset.n_vocab > config.vocab_size:
        raise TrainError(f"dataset {dataset.path} has vocabulary {dataset.n_vocab} but the model's vocab_size is "
                         f"{config.vocab_size}; set model.vocab_size to {dataset.n_vocab}")
    if dataset.n_vocab != config.vocab_size:
        raise TrainError(f"vocabulary mismatch: dataset {dataset.path} has n_vocab {dataset.n_vocab}, the model "
                         f"vocab_size {config.vocab_size}")
    if not dataset.split("train"):
        raise TrainError(f"dataset {dataset.path} has no train shards")


def check_run_dir(run_dir: Path) -> None:
    """A run directory that is a prepared dataset (the recipe's or another) would get config.yaml, checkpoints and
    logs among its shards; refused before anything is written."""
    if (run_dir / "manifest.json").exists():
        raise RecipeError(f"run_dir {run_dir} is a prepared dataset (it holds manifest.json); training would write "
                          f"its checkpoints and logs among the shards: set run_dir to a directory of its own")


def resume_point(ckpt_dir: Path, recipe: Recipe, log=print) -> tuple[str | None, dict | None]:
    """The newest complete, readable tag and its client_state; refuses a checkpoint of another model shape."""
    tag_dir, state = ckpt.resume_candidate(ckpt_dir, log)
    if tag_dir is None:
        return None, None
    tag = tag_dir.name
    want = recipe.model.to_dict()
    if state["model_config"] != want:
        diff = ", ".join(f"{k}: checkpoint {state['model_config'].get(k)!r} vs recipe {v!r}"
                         for k, v in want.items() if state["model_config"].get(k) != v)
        raise TrainError(f"{ckpt_dir / tag} holds a model of another shape ({diff}); "
                         f"use a new run_dir or the matching model section")
    return tag, state


class Trainer:
    def __init__(self, recipe: Recipe, allow_change: list[str] = ()):
        recipe = paths.absolute(recipe)  # what is saved names the same files from any directory
        self.recipe = recipe
        self.place = launch.setup()
        self.is_main = self.place.rank == 0
        self.plan = batch_plan(recipe, self.place.world_size)
        # One dataset (data.dir) or a mixture (data.mix), whose datasets share one tokenizer.
        self.sources = open_sources(recipe.data.entries())
        for source in self.sources:
            check_inputs(recipe, source.dataset)
        check_run_dir(Path(recipe.run_dir))
        self.model_config = recipe.model
        self.ds_config = deepspeed_config(recipe, self.plan)
        self.run_dir = Path(recipe.run_dir)
        self.ckpt_dir = rundir.RunDir(self.run_dir).checkpoints
        self.resume_tag, self.resume_state = resume_point(
            self.ckpt_dir, recipe, log=lambda line: print(line, flush=True) if self.is_main else None)
        # Refused here, before any engine or file exists; accepted changes are recorded once training resumes.
        check_allowed_keys(list(allow_change))
        self.saved_recipe = None if self.resume_state is None else paths.absolute(Recipe.from_saved(
            self.resume_state["config"], f"{self.ckpt_dir / self.resume_tag}: client_state config"))
        self.recipe_changes = {} if self.saved_recipe is None else check_resume(
            self.saved_recipe, recipe, list(allow_change), self.ckpt_dir / self.resume_tag)
        saved_world = self.resume_state["world_size"] if self.resume_state else self.place.world_size
        # ZeRO partitions optimizer state by rank; without ZeRO it sits whole in the model-states file.
        self.universal = (self.resume_tag is not None and saved_world != self.place.world_size
                          and zero_stage(self.ds_config) > 0)
        if self.universal and self.saved_recipe.optim.name == "muon":
            # Checked by hand on a 2-rank ZeRO-2 Muon checkpoint: ds_to_universal stops with KeyError 'exp_avg'
            # (it expects Adam's state in every group; the Muon group holds momentum_buffer).
            raise TrainError(f"{self.ckpt_dir / self.resume_tag} was trained with Muon on {saved_world} ranks; "
                             f"DeepSpeed 0.19.8 cannot convert Muon's optimizer state to a universal checkpoint, "
                             f"so resume it on {saved_world} ranks (this is {self.place.world_size})")
        if self.universal:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        # Built before any collective so a bad recipe or dataset fails on every rank alike, with nothing written.
        self.loader = train_loader(self.sources, self.plan.micro_batch, self.plan.seq_len, self.place.rank,
                                   self.place.world_size, recipe.seed, device=self.place.device)
        # Dataset name -> this rank's val batches of it (none when the run never evaluates).
        self.val = {s.name: val_batches(s.dataset, self.plan.micro_batch, self.plan.seq_len, self.place.rank,
                                        self.place.world_size, recipe.eval.val_batches if recipe.eval.every else 0)
                    for s in self.sources}
        self.peak = peak_flops(recipe.mfu, self.place.device)
        self.healer = heal.Healer(recipe.heal)
        # Tokenize the sample prompt now: a missing BPE cache should stop the run before step 0, not at step N.
        self.prompt_tokens = tokenizer.encode(recipe.sample.prompt) if recipe.sample.every else None
        # Warm start, read on every rank before anything is written; a resume continues its own checkpoint.
        self.init_weights, self.init_source = (None, None) if recipe.init_from is None or self.resume_tag else \
            warm_start.load(recipe.init_from, self.model_config)
        wandb_log.check_available(recipe.log)

    # ---- setup -------------------------------------------------------------------------------------------------
    def build(self) -> None:
        import deepspeed
        launch.init_distributed(self.place, timedelta(minutes=self.recipe.dist_timeout_minutes))
        self.allocator_reuses = self.place.device == "cpu" and reuse_freed_cpu_memory()
        if self.recipe.optim.name == "muon":
            # Every rank probes its own node, and all stop alike, before the run directory is touched.
            problem = launch.first_error(optim.muon_compile_problem(self.place.device), self.place.world_size)
            if problem:
                raise optim.ToolchainError(problem)
        # Before any update or run file: this run directory is ours alone (rank 0 holds the lock), and writable.
        self.run_lock = writer.claim(self.run_dir, self.place.rank, self.place.world_size)
        torch.manual_seed(self.recipe.seed)  # identical initial weights on every rank
        model = GPT(self.model_config)
        model.activation_checkpointing = self.recipe.activation_checkpointing
        if self.init_weights is not None:
            warm_start.apply(model, self.init_weights)
            self.init_weights = None
        self.n_params = model.num_params()
        built = optim.build(model, self.recipe.optim, self.place.device, offload=optimizer_offload(self.ds_config))
        # param_names: each group's parameter names in the optimizer's order, which is the order of its fp32 master
        # copies; checkpoints record them (client_state param_names) so the masters map to parameters by name.
        self.optimizer, self.peak_lrs, self.param_names = built.optimizer, built.peak_lrs, built.param_names
        self.hyperparameters = built.hyperparameters
        # ZeRO-0 in fp32 steps the torch optimizer as it is, and there DeepSpeed 0.19.8 clips with its own
        # clip_grad_norm_ and drops the norm (get_global_grad_norm() is None): the trainer clips instead and keeps
        # the norm on the device, read at the next update's one sync like DeepSpeed's.
        self.clips_itself = zero_stage(self.ds_config) == 0 and not self.ds_config.get("bf16", {}).get("enabled")
        if self.clips_itself:
            self.ds_config["gradient_clipping"] = 0.0
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        # DeepSpeed copies its zero_to_fp32.py / zero_to_torch.py into RUN/checkpoints at every save; they refuse
        # the GPU recipes' checkpoints (BF16_Optimizer state has no zero_stage) and unpickle without the trust
        # rule's checks. `python -m eval export` is the way to plain weights, so leave no script that fails.
        self.engine._copy_recovery_script = lambda save_path: None
        if self.clips_itself and self.place.world_size == 1:
            # Alone, DeepSpeed would still flatten every gradient, all-reduce it over one rank and copy it back
            # (about 10 ms an update for the tiny model on a CPU): one rank has nothing to reduce.
            self.engine.enable_backward_allreduce = False
        optim.forget_start_up_step(self.optimizer, zero_stage(self.ds_config),
                                   bool(self.ds_config.get("bf16", {}).get("enabled")))
        optim.check_grouping(self.engine.module, self.recipe.optim)
        if self.recipe.compile:
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
            error = None
            if self.is_main:
                try:
                    ckpt.to_universal(self.ckpt_dir, tag)
                except ckpt.CheckpointError as exc:
                    error = str(exc)
            error = launch.first_error(error, self.place.world_size)  # all stop alike when rank 0's fails
            if error:
                raise ckpt.CheckpointError(error)
            tag = tag + ckpt.UNIVERSAL_SUFFIX
        path, state = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise TrainError(f"DeepSpeed could not load {self.ckpt_dir / tag}")
        optim.restore_hyperparameters(self.optimizer, self.hyperparameters)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.loader.load_state_dict(state["loader"])
        if "heal" in state:  # the spike window and skip streak; a checkpoint without them starts both empty
            try:
                self.healer.load_state_dict(state["heal"])
            except (KeyError, TypeError, ValueError) as exc:
                raise TrainError(f"{self.ckpt_dir / tag}: client_state heal is damaged ({exc})") from None
        rng = state["rng"]
        if not self.universal and len(rng) == self.place.world_size:
            set_rng_state(rng[self.place.rank], self.place.device)
        else:
            torch.manual_seed(self.recipe.seed + self.step + self.place.rank)
        self.resumed_from = tag

    # ---- pieces of a step ----------------------------------------------------------------------------------------
    # ---- the update's one host sync -------------------------------------------------------------------------
    # In steady state an update reads the device once: one all_reduce carries the loss and whether any rank got a
    # stop signal, and the same read-back fetches the previous update's gradient norm (long computed by then), so
    # that update's metrics line is written one update late (_deferred). Reading the norm right after engine.step
    # would wait for the optimizer, and the host could not queue the next forward while the GPU finishes it.
    stop = None                # the StopFlag run() watches
    stop_requested = False     # some rank got SIGUSR1/SIGTERM, as of the last sync
    _synced_at = None          # perf_counter at the last sync; None after eval, sample or save
    _norm = None               # the last update's gradient norm (a device tensor or None), unread
    clips_itself = False       # the trainer, not DeepSpeed, clips the gradients (ZeRO-0 fp32; see build)
    _deferred = None           # that update's metrics record, written once its norm is read
    log = None                 # rank 0's RunLog during run()

    def _all_mean(self, value: torch.Tensor) -> float:
        """The mean of `value` over ranks, read back with the stop flags and the previous update's norm."""
        value = value.detach().float().reshape(1).to(self.engine.device)
        flag = value.new_full((1,), 1.0 if self.stop is not None and self.stop.signal is not None else 0.0)
        both = torch.cat([value, flag])
        dist.all_reduce(both)
        norm = self._norm
        on_device = torch.is_tensor(norm)
        values = torch.cat([both, norm.detach().float().reshape(1).to(both.device)] if on_device else [both])
        values = values.tolist()  # the sync
        self._synced_at = time.perf_counter()
        self.stop_requested = values[1] > 0
        self._write_deferred(values[2] if on_device else norm)
        return values[0] / self.place.world_size

    def _write_deferred(self, norm) -> None:
        if self._deferred is not None:
            self._deferred["grad_norm"] = None if norm is None else float(norm)
            if self.log is not None:
                self.log.write(self._deferred)
            self._deferred = None

    def _flush_deferred(self) -> None:
        """Write the pending metrics line now (before eval, sample, a checkpoint or the end: one more sync)."""
        self._write_deferred(self._norm)
        self._synced_at = None  # the next update's time starts at its own start, not at this step's extras

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

    def _clip(self) -> torch.Tensor:
        """The update's gradient norm before clipping (what DeepSpeed reports), clipping to optim.grad_clip. One
        fp32 norm over the tiny model's 6.4M-element embedding gradient is off by up to 5e-4 on a CPU (its kernel
        accumulates long runs in fp32), so each gradient is normed by rows in fp32 and the rows' norms summed in
        fp64: that agrees with DeepSpeed's fp64 norm (ZeRO 1-3) to about 1e-7 at a cost of one fp32 read."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        rows = [torch.linalg.vector_norm(g.reshape(len(g) if g.dim() > 1 else 1, -1), dim=1)
                for g in (p.grad for p in params)]
        norm = torch.linalg.vector_norm(torch.cat(rows), dtype=torch.float64)
        if self.recipe.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.recipe.optim.grad_clip, norm)
        return norm

    def _judge(self, loss: float, gradients_finite: bool = True) -> str | None:
        """Why this update is skipped (train.heal), None to apply it; stops the run after too many in a row."""
        try:
            return self.healer.judge(loss, self.step + 1, gradients_finite)
        except heal.TooManySkips as exc:
            n, first = self.healer.in_a_row, self.healer.first_skipped
            streak = (f"; {n} updates in a row skipped (from update {first}), more than heal.max_skips_in_a_row "
                      f"{self.recipe.heal.max_skips_in_a_row}") if n > 1 else ""
            raise TrainError(f"{exc} in update {self.step + 1} (after step {self.step}); stopped before it{streak} "
                             f"(last good checkpoint: {self._last_good()})") from None

    def train_step(self) -> dict:
        """One update's record for metrics.jsonl; a skipped update's (train.heal) has "skipped" and no step taken."""
        optim.set_lr(self.optimizer, self.peak_lrs, lr_multiplier(self.step, self.plan.max_steps,
                                                                  **schedule_shape(self.recipe)))
        started = time.perf_counter()
        since = self._synced_at or started  # one update's period: from the previous update's sync to this one's
        data_wait = 0.0  # seconds this step's micro batches kept the loop waiting for the loader
        loss_sum = torch.zeros((), device=self.engine.device)
        for micro in range(self.plan.grad_accum):
            waiting = time.perf_counter()
            x, y = self.loader.next()
            data_wait += time.perf_counter() - waiting
            loss = self._forward(x, y)
            self.engine.backward(loss)
            loss_sum += loss.detach().float()
            if micro == self.plan.grad_accum - 1:
                mean_loss = self._all_mean(loss_sum / self.plan.grad_accum)
                reason = self._judge(mean_loss)  # the same on every rank: the loss is the agreed mean
                if reason:
                    heal.skip_update(self.engine)
                    return self.healer.record(self.step + 1, reason, mean_loss)
                if self.clips_itself:
                    self._norm = self._clip()
                skipped = self.engine.skipped_steps
            self.engine.step()
        if self.engine.skipped_steps > skipped:
            # DeepSpeed's optimizer found the gradients not finite and dropped the update (a python counter its
            # own overflow check set: no extra sync); every rank's check agrees, so every rank returns here.
            reason = self._judge(mean_loss, gradients_finite=False)
            return self.healer.record(self.step + 1, reason, mean_loss)
        self.healer.applied(mean_loss)
        step_time = self._synced_at - since
        self.step += 1
        self.tokens_seen += self.plan.total_tokens
        if not self.clips_itself:
            self._norm = self.engine.get_global_grad_norm()
        tokens_per_s = self.plan.total_tokens / step_time
        # lr: group 0's (AdamW's) as DeepSpeed's optimizer holds it, i.e. what was applied; muon_lr likewise.
        lrs = {"lr": self.engine.get_lr()[0]}
        if self.recipe.optim.name == "muon":
            lrs["muon_lr"] = self.engine.get_lr()[-1]
        return {"step": self.step, "loss": mean_loss, **lrs,
                "tokens": self.tokens_seen,
                "tokens_per_s": tokens_per_s, "step_time_s": step_time, "data_wait_ms": data_wait * 1e3,
                "mfu": mfu(tokens_per_s, self.model_config, self.plan.seq_len, self.place.world_size, self.peak),
                "peak_mem_mb": peak_memory_mb(self.place.device)}

    @torch.no_grad()
    def validate(self) -> dict:
        """{"val_loss": mean over ranks}; with a mixture also "val_loss/NAME" for each dataset, and val_loss is then
        their mean weighted by the mixture's shares: the loss on the distribution the run trains on."""
        self.engine.eval()
        totals = torch.zeros(len(self.val), device=self.engine.device)
        for i, batches in enumerate(self.val.values()):
            for x, y in batches:
                totals[i] += self._forward(x, y).float()
        self.engine.train()
        sizes = torch.tensor([len(b) for b in self.val.values()], dtype=totals.dtype, device=totals.device)
        means = totals / sizes
        dist.all_reduce(means)  # one collective for every dataset
        losses = [value / self.place.world_size for value in means.tolist()]
        if len(losses) == 1:
            return {"val_loss": losses[0]}
        overall = sum(share * loss for share, loss in zip(self.loader.shares, losses))
        return {"val_loss": overall, **{f"val_loss/{name}": loss for name, loss in zip(self.val, losses)}}

    @torch.no_grad()
    def sample(self) -> list[str]:
        # Every rank generates (ZeRO-3 gathers parameters collectively in forward); rank 0 records the text.
        s = self.recipe.sample
        prompt = torch.tensor([self.prompt_tokens] * s.num, device=self.engine.device)
        generator = torch.Generator(device=self.engine.device).manual_seed(self.recipe.seed + self.step)
        self.engine.eval()
        out = self.engine.module.generate(prompt, s.max_new_tokens, top_k=50, generator=generator)
        self.engine.train()
        return [tokenizer.decode(row[prompt.size(1):].tolist()) for row in out]

    def save(self) -> None:
        # Every metrics line of the steps this checkpoint holds is on disk before its completion mark.
        self._flush_deferred()
        if self.log is not None:
            self.log.sync()
        states = [None] * self.place.world_size
        dist.all_gather_object(states, rng_state(self.place.device))
        client_state = {"model_config": self.model_config.to_dict(), "config": self.recipe.to_dict(), "step": self.step,
                        "tokens_seen": self.tokens_seen, "loader": self.loader.state_dict(), "rng": states,
                        "world_size": self.place.world_size, "heal": self.healer.state_dict()}
        client_state["param_names"] = self.param_names
        # Every rank's files, fsynced, then rank 0's completion mark; a failed write on any rank stops all of them.
        ckpt.save(self.engine, self.ckpt_dir, self.step, client_state, self.place.rank, self.place.world_size)
        if self.is_main:
            c = self.recipe.checkpoint
            ckpt.rotate(self.ckpt_dir, c.keep_last, c.keep_every)
        dist.barrier()

    def _preempted(self, stop: StopFlag) -> int:
        if self.is_main:
            print(f"preempted ({stop.signal or 'signal on another rank'}): saved "
                  f"{ckpt.tag_for(self.step)}, exiting with status {PREEMPTED_EXIT}", flush=True)
        return PREEMPTED_EXIT

    def _report_skip(self, record: dict, log) -> None:
        if log:
            log.write(record)
        if self.is_main:
            what = "non-finite loss" if record["loss"] is None else f"{record['skipped']}: loss {record['loss']:.4f}"
            print(f"warning: update {record['step']} skipped ({what}): its gradients "
                  f"dropped, its batch consumed ({record['skips_in_a_row']} in a row, of at most "
                  f"{self.recipe.heal.max_skips_in_a_row})", file=sys.stderr, flush=True)

    def _last_good(self) -> str:
        newest = ckpt.newest_complete(self.ckpt_dir)
        return newest.name if newest is not None else "none"

    def _record_recipe(self) -> None:
        """RUN/config.yaml is the recipe the newest checkpoint continues: written at the start of a run, and on a
        resume only when the user allowed changes, which RUN/recipe_history.jsonl then records."""
        if self.resume_tag is not None and not self.recipe_changes and rundir.RunDir(self.run_dir).config.exists():
            return
        rundir.write_recipe(self.run_dir, self.recipe.to_dict(), self.recipe_changes, self.step, self.resume_tag)

    # ---- the loop ------------------------------------------------------------------------------------------------
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
            self._record_recipe()
            draws = self.plan.max_steps * self.plan.total_tokens // self.plan.seq_len
            print(startup_table(r, self.plan, self.ds_config, self.n_params, compiled=self.engine.is_compiled,
                                checkpointing=self.engine.module.activation_checkpointing,
                                data_rows=[*self.loader.describe(draws),
                                           *([("initial weights", self.init_source)] if self.init_source else [])]),
                  flush=True)
            if self.resume_tag:
                print(f"resuming from {self.ckpt_dir / self.resumed_from} at step {self.step}", flush=True)
        # resumed_step: TensorBoard drops what the killed run logged after the checkpoint (logged again now).
        log = RunLog(self.run_dir, r.log.tensorboard,
                     resumed_step=self.step if self.resume_tag else None) if self.is_main else None
        if r.log.wandb:
            # Opened on rank 0 only, but a refusal must stop every rank: the others would wait for it in the
            # first update's collective until the process-group timeout.
            error = None
            if log:
                try:
                    log.sinks.append(wandb_log.WandbSink(self.run_dir, r))
                except wandb_log.WandbError as exc:
                    error = str(exc)
            error = launch.first_error(error, self.place.world_size)
            if error:
                if log:
                    log.close()
                raise wandb_log.WandbError(error)
        self.log, self.stop = log, stop
        dog = watchdog.Watchdog(r.heal.watchdog_minutes, self.place.rank).start(self.step)
        bar = tqdm(total=self.plan.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.is_main, file=sys.stderr)
        try:
            while self.step < self.plan.max_steps:
                record = self.train_step()
                dog.beat(self.step)
                if "skipped" in record:  # nothing was applied: no eval, sample or checkpoint of this step
                    self._report_skip(record, log)
                    if not self.stop_requested:
                        continue
                    self.save()  # the last applied step's weights, the loader past the skipped batches
                    return self._preempted(stop)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                data_wait=f"{record['data_wait_ms']:.1f}ms", refresh=False)
                if log and (record["step"] % r.log.every == 0 or self.step == self.plan.max_steps):
                    self._deferred = record  # written at the next update's sync, with its gradient norm
                last = self.step == self.plan.max_steps
                preempted = self.stop_requested
                if last or preempted or any(every and self.step % every == 0 for every in (
                        r.eval.every, r.sample.every, r.checkpoint.every)):
                    self._flush_deferred()
                if r.eval.every and (self.step % r.eval.every == 0 or last):
                    val = self.validate()
                    if log:
                        log.write({"step": self.step, **val})
                if r.sample.every and (self.step % r.sample.every == 0 or last):
                    texts = self.sample()
                    if log:
                        log.write_samples(self.step, r.sample.prompt, texts)
                if last or preempted or (r.checkpoint.every and self.step % r.checkpoint.every == 0):
                    self.save()
                if preempted and not last:
                    return self._preempted(stop)
            return 0
        except BaseException:
            # The updates before the failure are complete: the last one's line, deferred to the next update's
            # sync, is written now rather than lost with the run.
            with contextlib.suppress(Exception):
                self._flush_deferred()
            raise
        finally:
            dog.close()
            self.loader.close()
            bar.close()
            if log:
                log.close()
