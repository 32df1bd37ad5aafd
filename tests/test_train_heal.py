"""A run that heals (train.heal): a non-finite or spiking loss skips its update, bitwise as if its batch had been
absent; too many skips in a row stop the run naming the last good checkpoint. Real DeepSpeed engines on CPU (gloo),
faults injected by tests.heal_probe (a forward hook that makes the loss NaN)."""
import json
import math
import os
import subprocess
import textwrap

import pytest
import torch

from tests.conftest import PYTHON, REPO
from tests.fixtures_run import FAST, run_train, train_command
from tests.fixtures_run import free_port
from train.heal import SPIKE_MIN, Heal, Healer, TooManySkips

QUIET = ["eval.every=0", "sample.every=0", "log.tensorboard=false"]


def probe_run(run_dir, dataset, env: dict, *sets, nproc=1, port=None, check_rc=0):
    cmd = train_command(run_dir, dataset, *QUIET, *sets, nproc=nproc, port=port, module="tests.heal_probe")
    return run_train(cmd, check_rc=check_rc, env={**os.environ, **env})


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def live_weights(run_dir, step):
    return torch.load(run_dir / f"live_fp32_step{step}.pt", weights_only=True)


def client_state(run_dir, step) -> dict:
    """The trainer's client state of a checkpoint: rank 0's model-states file holds it (a test's own file)."""
    return torch.load(run_dir / f"checkpoints/global_step{step}/mp_rank_00_model_states.pt", weights_only=False)


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_nan_on_one_rank_is_skipped_on_every_rank_bitwise_as_if_the_batch_were_absent(tiny_dataset, tmp_path):
    # Update 2's loss is NaN on rank 1 only; the agreed (all-reduced) loss is NaN on both ranks, both skip. The
    # reference run draws and drops the same micro batches before its update 2: the same data after it.
    sets = ["schedule.max_steps=4", "checkpoint.every=2", "deepspeed=configs/deepspeed/zero2.json"]
    healed, reference = tmp_path / "healed", tmp_path / "reference"
    result = probe_run(healed, tiny_dataset, {"HEAL_PROBE_NAN": "2:1"}, *sets, nproc=2, port=free_port())
    probe_run(reference, tiny_dataset, {"HEAL_PROBE_DROP": "2"}, *sets, nproc=2, port=free_port())
    assert_bitwise_equal(live_weights(healed, 4), live_weights(reference, 4))
    records = lines(healed)
    assert records[1] == {"step": 2, "skipped": "non-finite", "loss": None, "skips_in_a_row": 1,
                          "time": records[1]["time"]}
    applied = [r for r in records if "skipped" not in r]
    assert [r["step"] for r in applied] == [1, 2, 3, 4]
    assert [r["loss"] for r in applied] == [r["loss"] for r in lines(reference)]
    assert "warning: update 2 skipped (non-finite loss): its gradients dropped, its batch consumed" in result.stderr
    # The checkpoint after the skip holds the loader past the skipped draws: a resume never reads them again.
    assert client_state(healed, 2)["loader"] == client_state(reference, 2)["loader"]


STAGES = [("zero0", "fp32"), ("zero1", "bf16"), ("zero2", "bf16"), ("zero3", "fp32")]


def test_every_zero_stage_and_precision_skips_without_touching_weights_or_optimizer(tiny_dataset, tmp_path):
    # Each DeepSpeed optimizer wrapper drops the update its own way (a bare torch AdamW under ZeRO-0 fp32,
    # BF16_Optimizer, ZeRO-1/2, ZeRO-3): the run with the skip ends bitwise where the run without the batch ends.
    # One process runs the 8 single-rank trainings one after another (start-up is most of a run's time here).
    script = textwrap.dedent("""
        import os, sys
        import torch.distributed as dist
        from tests.heal_probe import ProbeTrainer
        from train.recipe import load
        from train.stop import StopFlag
        stop = StopFlag()
        for run_dir, variable, value, *sets in (line.split() for line in sys.argv[1:]):
            os.environ.pop("HEAL_PROBE_NAN", None), os.environ.pop("HEAL_PROBE_DROP", None)
            os.environ[variable] = value
            assert ProbeTrainer(load("configs/train/tiny-cpu.yaml", [f"run_dir={run_dir}", *sets])).run(stop) == 0
        dist.destroy_process_group()
    """)
    common = [f"data.dir={tiny_dataset}", *FAST, *QUIET, "schedule.max_steps=3", "checkpoint.every=0"]
    runs = [f"{tmp_path / f'{ds}-{p}-{variable}'} HEAL_PROBE_{variable} 2 deepspeed=configs/deepspeed/{ds}.json "
            f"precision={p} " + " ".join(common) for ds, p in STAGES for variable in ("NAN", "DROP")]
    result = subprocess.run([PYTHON, "-c", script, *runs], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for ds, p in STAGES:
        healed, reference = tmp_path / f"{ds}-{p}-NAN", tmp_path / f"{ds}-{p}-DROP"
        assert_bitwise_equal(live_weights(healed, 3), live_weights(reference, 3))
        assert [r.get("skipped") for r in lines(healed)] == [None, "non-finite", None, None], (ds, p)
        assert [r["loss"] for r in lines(healed) if "skipped" not in r] == [r["loss"] for r in lines(reference)]


def test_nan_forever_stops_after_the_limit_naming_the_last_good_checkpoint(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    result = probe_run(run_dir, tiny_dataset, {"HEAL_PROBE_NAN": "4+"}, "schedule.max_steps=8", "checkpoint.every=2",
                       "heal.max_skips_in_a_row=2", check_rc=1)
    last = result.stderr.strip().splitlines()[-1]
    assert last == ("error: loss is nan in update 4 (after step 3); stopped before it; 3 updates in a row skipped "
                    "(from update 4), more than heal.max_skips_in_a_row 2 (last good checkpoint: global_step2)"), last
    assert [(r["step"], r.get("skipped")) for r in lines(run_dir)] == [(1, None), (2, None), (3, None),
                                                                       (4, "non-finite"), (4, "non-finite")]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == ["global_step2"]


def judged(healer, loss, update):
    """Healer.judge, then the update applied as the trainer applies it when judge lets it through."""
    reason = healer.judge(loss, update)
    if reason is None:
        healer.applied(loss)
    return reason


def test_healer_judges_non_finite_spikes_and_streaks():
    healer = Healer(Heal(max_skips_in_a_row=2, spike_factor=2.0))
    for _ in range(SPIKE_MIN - 1):
        assert judged(healer, 3.0, 1) is None
    assert judged(healer, 100.0, 1) is None  # too little history to call anything a spike: it joins the window
    healer = Healer(Heal(max_skips_in_a_row=2, spike_factor=2.0))
    for _ in range(SPIKE_MIN):
        assert judged(healer, 3.0, 1) is None
    assert judged(healer, 6.1, 11) == "spike"
    assert judged(healer, math.nan, 12) == "non-finite"
    assert judged(healer, 5.9, 13) is None and healer.in_a_row == 0  # below 2 x 3.0: applied, the streak ends
    assert judged(healer, math.inf, 14) == "non-finite"
    assert judged(healer, 7.0, 15) == "spike"  # the mean (3.0 x 10, 5.9) is 3.26: 7.0 is above twice that
    with pytest.raises(TooManySkips, match="loss is nan"):
        judged(healer, math.nan, 16)
    assert judged(Healer(Heal()), 1e9, 1) is None  # spike_factor defaults to off
    # The optimizer dropped an update whose loss was finite: a skip of its own kind, in the same streak.
    healer = Healer(Heal(max_skips_in_a_row=1))
    assert healer.judge(3.0, 1, gradients_finite=False) == "non-finite gradients" and healer.in_a_row == 1
    assert not healer.recent  # a dropped update's loss never joins the window
    with pytest.raises(TooManySkips, match=r"gradients are not finite \(loss 3.5000\)"):
        healer.judge(3.5, 2, gradients_finite=False)


def test_heal_section_bounds():
    from train.recipe import RecipeError, load
    base = [f"run_dir=x", "data.dir=y"]
    recipe = REPO / "configs/train/tiny-cpu.yaml"
    assert load(recipe, base).heal == Heal(max_skips_in_a_row=5, spike_factor=None, watchdog_minutes=30)
    for bad, message in [("heal.max_skips_in_a_row=-1", "heal.max_skips_in_a_row must be a non-negative integer"),
                         ("heal.spike_factor=1", "heal.spike_factor must be a number above 1"),
                         ("heal.spike_factor=.nan", "heal.spike_factor must be a number above 1"),
                         ("heal.watchdog_minutes=-1", "heal.watchdog_minutes must be a non-negative number"),
                         ("heal.watchdog_minutes=1e9", "heal.watchdog_minutes must be a non-negative number"),
                         ("heal.watchdog=1", "unknown recipe key 'heal.watchdog'")]:
        with pytest.raises(RecipeError, match=message):
            load(recipe, [*base, bad])


def test_eval_report_reads_no_skipped_update_as_a_training_line(tmp_path):
    from eval.report import read_metrics
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 3.0, "lr": 1e-3}, {"step": 2, "skipped": "non-finite", "loss": None, "skips_in_a_row": 1},
        {"step": 2, "loss": 2.9, "lr": 1e-3}, {"step": 3, "skipped": "spike", "loss": 9.0, "skips_in_a_row": 1}]) + "\n")
    train, _val = read_metrics(tmp_path)
    assert {step: line["loss"] for step, line in train.items()} == {1: 3.0, 2: 2.9}


def test_a_resume_restores_the_spike_window_and_the_skip_streak(tiny_dataset, tmp_path):
    # Without them, a resumed run would not test for spikes for SPIKE_MIN updates where the uninterrupted run did:
    # the two would skip different updates and part ways.
    from tests.test_train_step import probe
    run_dir = tmp_path / "run"
    train = """
        from train.stop import StopFlag
        print(json.dumps(trainer.run(StopFlag())))
    """
    assert probe(train, run_dir, tiny_dataset, "schedule.max_steps=4", "checkpoint.every=4") == 0
    saved = client_state(run_dir, 4)["heal"]
    losses = [line["loss"] for line in lines(run_dir) if "loss" in line]
    assert len(losses) == 4 and saved["recent"][:4].tolist() == losses and saved["recent"][4:].isnan().all()
    assert (saved["in_a_row"], saved["first_skipped"]) == (0, None)
    resumed = """
        trainer.build()
        h = trainer.healer
        print(json.dumps({"recent": list(h.recent), "in_a_row": h.in_a_row, "first_skipped": h.first_skipped}))
    """
    assert probe(resumed, run_dir, tiny_dataset, "schedule.max_steps=8", "checkpoint.every=4",
                 "heal.spike_factor=3.0", allow=("schedule.max_steps", "heal.spike_factor")) == {
        "recent": losses, "in_a_row": 0, "first_skipped": None}
    healer = Healer(Heal(spike_factor=2.0))
    for _ in range(SPIKE_MIN):
        judged(healer, 3.0, 1)
    healer.in_a_row, healer.first_skipped = 1, 7
    state = healer.state_dict()
    assert state["recent"].shape == client_state(run_dir, 4)["heal"]["recent"].shape  # one size at every step
    again = Healer(Heal(spike_factor=2.0))
    again.load_state_dict(state)
    assert again.judge(6.1, 9) == "spike" and again.in_a_row == 2 and again.first_skipped == 7
    with pytest.raises(ValueError, match="not a heal state"):
        again.load_state_dict({"recent": [3.0], "in_a_row": 0, "first_skipped": None})


def test_updates_deepspeed_drops_for_non_finite_gradients_are_skips_and_stop_the_run(tiny_dataset, tmp_path):
    # lr 10 and weight decay 10 scale the decayed weights by -99 per update: at ZeRO-1 fp32 the gradients overflow
    # while the loss is still finite, and DeepSpeed's optimizer drops the update itself. Each drop counts as a skip.
    run_dir = tmp_path / "run"
    result = run_train(train_command(run_dir, tiny_dataset, *QUIET, "deepspeed=configs/deepspeed/zero1.json",
                                     "optim.max_lr=10", "optim.weight_decay=10", "optim.warmup_steps=0",
                                     "schedule.max_steps=12", "checkpoint.every=1", "heal.max_skips_in_a_row=2"),
                       check_rc=1)
    records = lines(run_dir)
    dropped = [r for r in records if r.get("skipped") == "non-finite gradients"]
    assert len(dropped) == 2 and all(math.isfinite(r["loss"]) for r in dropped), records
    first = dropped[0]["step"]
    assert [r["skips_in_a_row"] for r in dropped] == [1, 2] and {r["step"] for r in dropped} == {first}
    assert [r["step"] for r in records if "skipped" not in r] == list(range(1, first))
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: gradients are not finite (loss ") and last.endswith(
        f" in update {first} (after step {first - 1}); stopped before it; 3 updates in a row skipped (from update "
        f"{first}), more than heal.max_skips_in_a_row 2 (last good checkpoint: global_step{first - 1})"), last
    assert f"warning: update {first} skipped (non-finite gradients: loss " in result.stderr
