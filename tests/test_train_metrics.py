"""train/metrics.py after a kill: no fragment merges into the next record, one value per step in every view."""
import json
import shutil

from tests.fixtures_run import run_train, train_command


def lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def cut_in_half(line):
    return line[:len(line) // 2]


def test_a_run_resumed_after_a_kill_reads_one_value_per_step(tiny_run, tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from eval.report import read_metrics
    # What a SIGKILL in the middle of writing step 6's lines leaves (tiny_run checkpoints every 3 steps): the
    # step-3 checkpoint as the newest, steps 4-5 logged, half of step 6's metrics line and of a sample record,
    # TensorBoard events up to step 6.
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints" / "global_step3", run / "checkpoints" / "global_step3")
    (run / "checkpoints" / "latest").write_text("global_step3")
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    shutil.copy(tiny_run / "format.json", run / "format.json")
    shutil.copytree(tiny_run / "tb", run / "tb")
    metrics = lines(tiny_run / "metrics.jsonl")
    before = [m for m in metrics if json.loads(m)["step"] <= 5]
    step6 = next(m for m in metrics if json.loads(m)["step"] == 6 and "loss" in json.loads(m))
    (run / "metrics.jsonl").write_text("\n".join(before) + "\n" + cut_in_half(step6))
    samples = lines(tiny_run / "samples.jsonl")
    kept = [s for s in samples if json.loads(s)["step"] <= 3]
    (run / "samples.jsonl").write_text("\n".join(kept) + "\n" + cut_in_half(samples[-1]))

    out = run_train(train_command(run, tiny_dataset))
    assert "partial last line" in out.stderr  # said once per file, not silently

    # Every line is whole JSON again: the fragments were cut, not merged into the resumed run's first records.
    records = [json.loads(m) for m in lines(run / "metrics.jsonl")]
    assert [json.loads(s)["step"] for s in lines(run / "samples.jsonl")].count(6) == len(
        [s for s in samples if json.loads(s)["step"] == 6])
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 4, 5, 6]  # 4 and 5 logged twice

    # The report's reader: one value per step, the resumed run's line.
    train, val = read_metrics(run)
    assert sorted(train) == [1, 2, 3, 4, 5, 6] and sorted(val) == [3, 6]
    second_4 = [r for r in records if r["step"] == 4 and "loss" in r][1]
    assert train[4] == second_4

    # TensorBoard: the resumed writer purged the killed run's events after step 3.
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    assert all(abs(e.value - train[e.step]["loss"]) < 1e-5 for e in loss)  # TensorBoard stores float32
    assert [e.step for e in events.Scalars("val/val_loss")] == [3, 6]


def test_mfu_peak_follows_the_exact_cuda_device_name(monkeypatch):
    # CUDA cannot exist here: torch.cuda.get_device_name is replaced by the strings the drivers report.
    import torch

    from common.hardware import gpu_kind
    from train.metrics import peak_flops
    from train.recipe import Mfu
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA A100-SXM4-80GB": 312e12,
             "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12}
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(Mfu(), "cuda:0") == peak, name
    assert gpu_kind("NVIDIA A100 80GB PCIe") == "a100-80gb" and gpu_kind("NVIDIA A100-PCIE-40GB") == "a100-40gb"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    assert peak_flops(Mfu(), "cuda:0") is None  # unknown: no MFU rather than a wrong one
    assert peak_flops(Mfu(gpu="h100-nvl"), "cpu") == 835e12
