"""train/schedule.py and the schedule keys of the recipe: cosine and warmup-stable-decay, and the lr the trainer
applies to every param group (AdamW's and Muon's alike, the schedule multiplies each group's peak)."""
import math

import pytest

from tests.conftest import REPO
from train.recipe import RecipeError, load, schedule_shape
from train.schedule import decay_steps, learning_rate, lr_multiplier

TINY = REPO / "configs/train/tiny-cpu.yaml"


def test_cosine_is_unchanged_and_the_default():
    r = load(TINY)
    assert (r.schedule.kind, r.schedule.decay_fraction, r.schedule.decay_shape) == ("cosine", 0.2, "linear")
    kw = dict(max_lr=6e-4, min_lr_ratio=0.1, warmup_steps=715, max_steps=19073)
    assert learning_rate(0, **kw) == pytest.approx(6e-4 / 715)
    assert learning_rate(714, **kw) == pytest.approx(6e-4)
    assert learning_rate(19072, **kw) == pytest.approx(6e-5)
    assert learning_rate(8000, **kw) == learning_rate(8000, **kw, kind="cosine")


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_warmup_then_constant_then_decay_over_the_last_fraction(shape):
    # 1000 updates, warmup 100, decay over the last 200: updates 100..799 at the peak, 800..999 decaying.
    kw = dict(max_steps=1000, warmup_steps=100, min_lr_ratio=0.1, kind="wsd", decay_fraction=0.2, decay_shape=shape)
    assert decay_steps(1000, 0.2) == 200
    assert lr_multiplier(0, **kw) == pytest.approx(1 / 100)             # step 0
    assert lr_multiplier(99, **kw) == pytest.approx(1.0)                # end of warmup
    assert all(lr_multiplier(s, **kw) == 1.0 for s in range(100, 800))  # stable
    first = lr_multiplier(800, **kw)                                    # start of decay: one step down
    progress = 1 / 200
    fall = progress if shape == "linear" else math.sqrt(progress)
    assert first == pytest.approx(1 - fall * 0.9) and first < 1.0
    assert lr_multiplier(999, **kw) == pytest.approx(0.1)               # last step: min_lr_ratio
    decay = [lr_multiplier(s, **kw) for s in range(799, 1000)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    half = lr_multiplier(899, **kw)  # halfway through the decay
    assert half == pytest.approx(0.55 if shape == "linear" else 1 - math.sqrt(0.5) * 0.9)


def test_recipe_schedule_keys_are_validated():
    r = load(TINY, ["schedule.kind=wsd", "schedule.decay_fraction=0.5", "schedule.decay_shape=1-sqrt"])
    assert schedule_shape(r) == {"warmup_steps": 10, "min_lr_ratio": 0.1, "kind": "wsd", "decay_fraction": 0.5,
                                 "decay_shape": "1-sqrt"}
    with pytest.raises(RecipeError, match="schedule.kind must be cosine or wsd, got 'step'"):
        load(TINY, ["schedule.kind=step"])
    with pytest.raises(RecipeError, match="schedule.decay_shape must be linear or 1-sqrt"):
        load(TINY, ["schedule.decay_shape=cosine"])
    for bad in ("0", "1.5", "true"):
        with pytest.raises(RecipeError, match="schedule.decay_fraction must be a number in"):
            load(TINY, [f"schedule.decay_fraction={bad}"])
    # 200 steps, warmup 10: a decay over 191 or more of them would start inside the warmup.
    with pytest.raises(RecipeError, match=r"warmup \(10 updates\) and the decay \(196 updates"):
        load(TINY, ["schedule.kind=wsd", "schedule.decay_fraction=0.98"])
    load(TINY, ["schedule.kind=cosine", "schedule.decay_fraction=0.98"])  # only wsd has a decay phase
