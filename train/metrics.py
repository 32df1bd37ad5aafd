"""Rank 0's records of a run: metrics.jsonl (append-only), TensorBoard events, samples.jsonl; and MFU."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from common.hardware import gpu_spec
from model.flops import flops_per_token


def peak_flops(mfu_section: dict, device: str) -> float | None:
    """Per-device peak bf16 FLOP/s from the recipe's override or model.hardware's table; None when unknown (CPU)."""
    if mfu_section["peak_tflops"] is not None:
        return float(mfu_section["peak_tflops"]) * 1e12
    name = mfu_section["gpu"]
    if name == "auto":
        if not device.startswith("cuda"):
            return None
        device_name = torch.cuda.get_device_name(device).lower()
        known = [("h200", "h200"), ("h100", "h100"), ("a100", "a100-80gb" if "80" in device_name else "a100-40gb")]
        name = next((spec for key, spec in known if key in device_name), None)
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
    """Appends one JSON object per line and mirrors scalars to TensorBoard; only rank 0 makes one."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.run_dir = Path(run_dir)
        self.metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.samples_path = self.run_dir / "samples.jsonl"
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.run_dir / "tb"))

    def write(self, record: dict) -> None:
        record = {**record, "time": round(time.time(), 3)}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"{'val' if key.startswith('val') else 'train'}/{key}", value, record["step"])
            self.tb.flush()

    def write_samples(self, step: int, prompt: str, texts: list[str]) -> None:
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"step": step, "index": i, "prompt": prompt, "text": text}) + "\n")
        if self.tb is not None:
            self.tb.add_text("samples", "\n\n".join(texts), step)

    def close(self) -> None:
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()


def mfu(tokens_per_s: float, model_config, seq_len: int, world_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s per device over the device's peak."""
    if peak is None:
        return None
    return tokens_per_s * flops_per_token(model_config, seq_len) / world_size / peak
