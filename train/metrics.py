"""Rank 0's records of a run: metrics.jsonl (append-only), TensorBoard events, samples.jsonl; and MFU."""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

from common.files import append_json_line, fsync_file
from common.hardware import gpu_kind, gpu_spec
from model.flops import flops_per_token

from .rundir import RunDir


def peak_flops(mfu_section, device: str) -> float | None:
    """Per-device peak bf16 FLOP/s from the recipe's mfu section (train.recipe.Mfu): its override, or
    common.hardware's table; None when unknown (CPU)."""
    if mfu_section.peak_tflops is not None:
        return float(mfu_section.peak_tflops) * 1e12
    name = mfu_section.gpu
    if name == "auto":
        if not device.startswith("cuda"):
            return None
        name = gpu_kind(torch.cuda.get_device_name(device))
        if name is None:
            return None
    return gpu_spec(name).peak_bf16_flops


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


class RunLog:
    """Appends one JSON object per line and mirrors scalars to TensorBoard; only rank 0 makes one.

    Every line goes through common.files.append_line: a fragment left by a killed writer is cut before the next
    record, never merged into it. A run resumed from the checkpoint at step S logs steps S+1.. again; readers of
    metrics.jsonl keep the last line per step, and TensorBoard is told to drop the old events from S+1 on
    (purge_step), so every view shows one value per step.

    Lines reach the OS at once (a killed trainer loses none) but are fsynced, and TensorBoard flushed, at most every
    DURABLE_EVERY_S seconds and whenever the trainer calls sync(), before each checkpoint is marked complete: a
    machine crash can cost the last seconds of lines, never a line of a step a checkpoint holds. (An fsync per line
    costs 1-20 ms on a network filesystem, paid by every rank waiting on rank 0.)
    """
    DURABLE_EVERY_S = 5.0

    def __init__(self, run_dir: Path, tensorboard: bool, resumed_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.metrics_path = RunDir(run_dir).metrics
        self.samples_path = RunDir(run_dir).samples
        self.tb = None
        self.sinks = []  # more receivers of the TensorBoard scalars: .log(scalars, step), .close() (train.wandb_log)
        self.synced = time.monotonic()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            purge = None if resumed_step is None else resumed_step + 1
            self.tb = SummaryWriter(str(RunDir(run_dir).tensorboard), purge_step=purge)

    def _append(self, path: Path, record: dict) -> None:
        cut = append_json_line(path, record, durable=False)
        if cut:
            print(f"warning: {path}: cut a partial last line ({cut} bytes) left by a killed writer", file=sys.stderr)
        if time.monotonic() - self.synced >= self.DURABLE_EVERY_S:
            self.sync()

    def sync(self) -> None:
        """Everything written so far durable: both files fsynced, TensorBoard's events flushed."""
        for path in (self.metrics_path, self.samples_path):
            fsync_file(path)
        if self.tb is not None:
            self.tb.flush()
        self.synced = time.monotonic()

    def write(self, record: dict) -> None:
        record = {**record, "time": round(time.time(), 3)}
        self._append(self.metrics_path, record)
        scalars = {f"{'val' if key.startswith('val') else 'train'}/{key}": value for key, value in record.items()
                   if key not in ("step", "time") and isinstance(value, (int, float)) and value is not None}
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, record["step"])
        for sink in self.sinks:
            sink.log(scalars, record["step"])

    def write_samples(self, step: int, prompt: str, texts: list[str]) -> None:
        for i, text in enumerate(texts):
            self._append(self.samples_path, {"step": step, "index": i, "prompt": prompt, "text": text})
        if self.tb is not None:
            self.tb.add_text("samples", "\n\n".join(texts), step)

    def close(self) -> None:
        self.sync()
        if self.tb is not None:
            self.tb.close()
        for sink in self.sinks:
            sink.close()


def mfu(tokens_per_s: float, model_config, seq_len: int, world_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s per device over the device's peak."""
    if peak is None:
        return None
    return tokens_per_s * flops_per_token(model_config, seq_len) / world_size / peak
