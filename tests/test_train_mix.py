"""Mixtures of prepared datasets (data.mix): the recipe, the deficit-driven interleaving, exact resume on 2 ranks,
world-size change, per-dataset validation loss, and that a single data.dir reads exactly what it read before."""
import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest

from prep.reader import Dataset, DatasetError
from tests.conftest import PYTHON, REPO, SHARED
from tests.fixtures_data import write_jsonl
from tests.fixtures_run import read_metrics, run_train, train_command
from tests.fixtures_run import free_port
from train.data import Interleave, MixLoader, Source, TrainLoader, open_sources
from train.recipe import RecipeError, load
from train.rundir.checkpoints import read_client_state
from train.rundir.identity import checkpoint_identity

TINY = REPO / "configs/train/tiny-cpu.yaml"


def gcide_documents(start: int, size: int) -> list[str]:
    """Whole dictionary entries (blank-line separated) from `size` characters of gcide.txt at `start`."""
    with open(SHARED / "data" / "gcide.txt", encoding="utf-8", errors="replace") as f:
        f.seek(start)
        block = f.read(size)
    return [b.strip() for b in block.split("\n\n") if b.strip()][1:-1]  # the first and last may be cut


@pytest.fixture(scope="module")
def dictionaries(tmp_path_factory) -> list:
    """Two small prepared datasets of real dictionary text (~107k train tokens each), from two letters of GCIDE."""
    root = tmp_path_factory.mktemp("gcide")
    out = []
    for name, start in (("gcide_c", 2_000_000), ("gcide_p", 25_000_000)):
        src = write_jsonl(root / f"{name}.jsonl", [{"id": f"{name}-{i}", "text": d}
                                                   for i, d in enumerate(gcide_documents(start, 300_000))])
        subprocess.run([PYTHON, "-m", "prep", "tokenize", "--input", str(src), "--out", str(root / name),
                        "--shard-tokens", "40000", "--val-tokens", "8000"], check=True, cwd=REPO, capture_output=True)
        out.append(root / name)
    return out


@pytest.fixture(scope="module")
def sources(tiny_dataset, dictionaries):
    """Shakespeare (9,701 windows of 33 tokens), and the two dictionaries (about 3,350 windows each)."""
    paths = [tiny_dataset, *dictionaries]
    return {s.name: s for s in open_sources([(p.name, str(p), 1) for p in paths])}


def mixture(sources, weights: dict) -> list[Source]:
    return [Source(name, sources[name].dataset, weight) for name, weight in weights.items()]


# ---- a single data.dir is what it was -------------------------------------------------------------------------

def test_a_single_dir_reads_exactly_the_batches_it_read_before_mixtures(tiny_dataset):
    # The digest of 90 micro steps (past an epoch boundary) on both of 2 ranks, taken with the loader as it was
    # before mixtures were added; same dataset bytes (prep is byte-identical), same seed.
    digest = hashlib.sha256()
    for rank in range(2):
        loader = TrainLoader(Dataset(tiny_dataset), 64, 32, rank, 2, seed=5)
        for _ in range(90):
            x, y = loader.next()
            digest.update(x.numpy().tobytes())
            digest.update(y[:, -1:].numpy().tobytes())
        assert loader.state_dict() == {"epoch": 1, "position": 1920, "seed": 5, "windows": 9701, "order": "feistel"}
        loader.close()
    assert digest.hexdigest() == "eb2a155764c9069fcc8d89def549236865dffadbcbd0828d387e4770a33d05b6"


# ---- the interleaving -----------------------------------------------------------------------------------------

WEIGHTS = [
    {"ds": 0.7, "gcide_c": 0.3},
    {"ds": 0.9, "gcide_c": 0.1},
    {"ds": 0.5, "gcide_c": 0.3, "gcide_p": 0.2},
    {"ds": 2, "gcide_c": 1, "gcide_p": 1},
]


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: "/".join(map(str, w.values())))
def test_realised_shares_follow_the_weights_over_any_span_of_1000_steps(sources, weights):
    # 2 ranks x micro batch 4 x 2 micro steps: 16 windows per update, 16,000 over 1,000 updates (Shakespeare at
    # 0.9 runs out and starts its next epoch). Every span [a, b) of updates, not only the whole run.
    B, world, accum, steps = 4, 2, 2, 1000
    mix = mixture(sources, weights)
    loaders = [MixLoader(mix, B, 32, rank, world, seed=11, prefetch=0) for rank in range(world)]
    per_update = np.zeros((steps, len(mix)), dtype=np.int64)
    drawn = [[[] for _ in mix] for _ in range(world)]  # rank -> dataset -> window numbers, in draw order
    for step in range(steps):
        for _ in range(accum):
            for rank, loader in enumerate(loaders):
                datasets, windows = loader.next_windows()
                per_update[step] += np.bincount(datasets, minlength=len(mix))
                for d, w in zip(datasets, windows):
                    drawn[rank][d].append(int(w))
    total = sum(weights.values())
    shares = np.array([w / total for w in weights.values()])
    assert np.allclose(loaders[0].shares, shares)
    # The lag of each dataset's count behind share x windows, at every update boundary; over the span [a, b)
    # the count is off by lag(b) - lag(a), so the worst span is max(lag) - min(lag).
    windows_so_far = np.arange(steps + 1)[:, None] * B * world * accum
    lag = windows_so_far * shares - np.concatenate([np.zeros((1, len(mix)), int), np.cumsum(per_update, axis=0)])
    worst = float((lag.max(axis=0) - lag.min(axis=0)).max())
    tolerance = loaders[0].interleave.span_error()
    assert worst <= tolerance + 1e-9 <= Interleave.SPAN_TOLERANCE + 1e-9, (worst, tolerance)
    # Independent random draws at the same weights stray by tens of windows over such a run.
    rng = np.random.default_rng(0)
    random_counts = np.cumsum(rng.multinomial(B * world * accum, shares, size=steps), axis=0)
    random_lag = windows_so_far[1:] * shares - random_counts
    assert float((random_lag.max(axis=0) - random_lag.min(axis=0)).max()) > 5 * Interleave.SPAN_TOLERANCE
    # Each dataset in its own keyed order: the ranks share no window within an epoch of it, an epoch visits
    # every window once, and the next epoch is another order.
    for d, source in enumerate(mix):
        n = loaders[0].indexes[d].total
        counts = [len(drawn[r][d]) for r in range(world)]
        assert abs(sum(counts) - shares[d] * steps * B * world * accum) <= tolerance
        full = sum(counts) // n  # epochs completed; the draws of the one under way are all distinct
        multiplicity = np.bincount([w for r in range(world) for w in drawn[r][d]], minlength=n)
        assert multiplicity.min() >= full and multiplicity.max() <= full + 1, source.name
    for loader in loaders:
        loader.close()


def test_ranks_take_disjoint_blocks_of_one_global_stream_on_any_world_size(sources):
    # The draws are numbered globally, so 2 ranks, 4 ranks and 1 rank walk the same stream; a checkpoint of 2 ranks
    # continues on 3 (a world-size change) exactly where the global stream was.
    mix = mixture(sources, {"ds": 0.5, "gcide_c": 0.3, "gcide_p": 0.2})
    B = 2

    def stream(world, micro_steps, state=None):
        loaders = [MixLoader(mix, B, 32, r, world, seed=4, prefetch=0) for r in range(world)]
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(json.loads(json.dumps(state)))
        pairs = []
        for _ in range(micro_steps):
            for loader in loaders:  # rank order: rank r holds the r-th block of the micro step
                datasets, windows = loader.next_windows()
                pairs += list(zip(datasets.tolist(), windows.tolist()))
        assert len({loader.state_dict()["mix"][0]["drawn"] for loader in loaders}) == 1  # ranks agree on the state
        return pairs, loaders[0].state_dict()

    one, _ = stream(1, 600)
    two, two_state = stream(2, 150)
    four, _ = stream(4, 150)
    assert len(one) == 1200 and two == one[:600] and four == one
    on_three, _ = stream(3, 100, two_state)
    assert on_three == one[600:]
    assert len(set(two[:4])) == 4  # the 4 windows of a micro step on 2 ranks: no rank reads another's


def test_a_checkpoint_with_batches_in_flight_resumes_at_the_first_unseen_batch(sources):
    mix = mixture(sources, {"ds": 0.7, "gcide_c": 0.3})
    reference = MixLoader(mix, 4, 32, 1, 2, seed=9, prefetch=0)
    expected = [reference.next() for _ in range(40)]
    a = MixLoader(mix, 4, 32, 1, 2, seed=9)
    for _ in range(15):
        a.next()  # eight more are read ahead by now
    b = MixLoader(mix, 4, 32, 1, 2, seed=9)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for x_ref, y_ref in expected[15:]:
        x, y = b.next()
        assert bool((x == x_ref).all() and (y == y_ref).all())
    a.close()
    b.close()


def test_new_weights_on_resume_count_from_the_checkpoint(sources):
    # --allow-change data.mix: the draws so far stay, the interleaving restarts at the new shares from there, so
    # every span after the resume follows the new weights (the newly favoured dataset does not catch up on the past).
    old = MixLoader(mixture(sources, {"ds": 0.9, "gcide_c": 0.1}), 4, 32, 0, 1, seed=2, prefetch=0)
    for _ in range(250):
        old.next_windows()
    new = MixLoader(mixture(sources, {"ds": 0.5, "gcide_c": 0.5}), 4, 32, 0, 1, seed=2, prefetch=0)
    new.load_state_dict(old.state_dict())
    state = new.state_dict()
    assert [d["drawn"] for d in state["mix"]] == [900, 100] and [d["base"] for d in state["mix"]] == [900, 100]
    counts = np.zeros(2, dtype=np.int64)
    for step in range(50):
        counts += np.bincount(new.next_windows()[0], minlength=2)
        assert np.abs(counts - (step + 1) * 4 * 0.5).max() <= new.interleave.span_error()
    again = MixLoader(mixture(sources, {"ds": 0.5, "gcide_c": 0.5}), 4, 32, 0, 1, seed=2, prefetch=0)
    again.load_state_dict(json.loads(json.dumps(new.state_dict())))  # same weights: the base is kept
    assert again.state_dict() == new.state_dict() and again.next_windows()[1].tolist() == \
        new.next_windows()[1].tolist()


def test_a_state_of_another_mixture_or_of_one_dataset_is_refused_in_one_line(sources, tiny_dataset):
    mix = MixLoader(mixture(sources, {"ds": 0.7, "gcide_c": 0.3}), 2, 32, 0, 1, seed=1, prefetch=0)
    single = TrainLoader(Dataset(tiny_dataset), 2, 32, 0, 1, seed=1, prefetch=0)
    other = MixLoader(mixture(sources, {"ds": 0.7, "gcide_p": 0.3}), 2, 32, 0, 1, seed=1, prefetch=0)
    cases = [(mix, single.state_dict(), "the checkpoint's loader read one dataset (9701 windows), this recipe mixes "
                                        "ds (9701 windows, weight 0.7)"),
             (single, mix.state_dict(), "the checkpoint's loader drew from a mixture (ds (9701 windows, weight 0.7), "
                                        "gcide_c"),
             (mix, other.state_dict(), "loader state does not match this mixture/seed (the checkpoint drew from "
                                       "ds (9701 windows, weight 0.7), gcide_p"),
             (mix, {**mix.state_dict(), "seed": 2}, "with seed 2; this recipe:")]
    tampered = mix.state_dict()
    tampered["mix"][0]["drawn"] = 5
    cases.append((mix, tampered, "loader state: the draws [5, 0] are not what the interleaving of"))
    for loader, state, message in cases:
        with pytest.raises(DatasetError) as err:
            loader.load_state_dict(state)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


# ---- the recipe -----------------------------------------------------------------------------------------------

MIX_A_B = "data.mix=[{dir: /d/a, weight: 0.7}, {dir: /d/b, weight: 0.3}]"


@pytest.mark.parametrize("sets, message", [
    ([MIX_A_B], "give exactly one of data.dir (one dataset) and data.mix (several, with weights); both are set "
                "(a recipe file's data.dir is cleared with --set data.dir=null)"),
    (["data.dir=null"], "give exactly one of data.dir (one dataset) and data.mix"),
    (["data.dir=null", "data.mix=[{dir: /d/a, weight: 0}, {dir: /d/b, weight: 1}]"],
     "data.mix[0].weight must be a positive number, got 0"),
    (["data.dir=null", "data.mix=[{dir: /d/a, weight: 1}, {dir: /d/b, weight: -0.5}]"],
     "data.mix[1].weight must be a positive number, got -0.5"),
    (["data.dir=null", "data.mix=[{dir: /d/a, weight: 1}, {dir: /d/b, weight: heavy}]"],
     "data.mix[1].weight must be a positive number, got 'heavy'"),
    (["data.dir=null", "data.mix=[{dir: /d/a, weight: 1}, {weight: 1}]"],
     "data.mix[1].dir is required: the directory of a prepared dataset"),
    (["data.dir=null", "data.mix=[{dir: /d/a, weight: 1}, {dir: /d/b}]"], "data.mix[1].weight is required"),
    (["data.dir=null", "data.mix=[{dir: /d/a, weight: 1}]"], "data.mix lists one dataset; a mixture needs two"),
    (["data.dir=null", "data.mix=[{dir: /d/a, weight: 1}, {dir: /e/a, weight: 1}]"],
     "data.mix[1]: the name 'a' is data.mix[0]'s too; set data.mix[1].name"),
    (["data.dir=null", "data.mix=[{dir: /d/a, weight: 1}, {dir: /d/a/, weight: 1, name: b}]"],
     "data.mix[1].dir /d/a/ is data.mix[0]'s too"),
    (["data.dir=null", "data.mix=[{dir: /d/a, weight: 1}, {dir: /d/b, weight: 1, name: 'a b'}]"],
     "data.mix[1]: the name 'a b' is not letters, digits"),
    (["data.dir=null", "data.mix=[{dir: /d/a, wieght: 1}, {dir: /d/b, weight: 1}]"],
     "unknown recipe key 'data.mix[0].wieght'; known keys here: dir, weight, name"),
    (["data.dir=null", "data.mix={dir: /d/a}"], "data.mix must be a list of mappings"),
    (["data.dir=null", "data.mix=[{dir: /d/a, weight: 1}, {dir: /d/b, weight: 1.0e-6}]"],
     "data.mix[1].weight 1e-06 is below 1/65,536 of the total"),
])
def test_recipe_refuses_a_bad_data_section_in_one_line(sets, message):
    with pytest.raises(RecipeError) as err:
        load(TINY, sets)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_mix_recipe_resolves_names_and_round_trips_through_config_yaml():
    recipe = load(TINY, ["data.dir=null", "data.mix=[{dir: /d/web, weight: 7}, {dir: /d/code, weight: 3, name: c}]"])
    assert recipe.data.entries() == [("web", "/d/web", 7), ("c", "/d/code", 3)]
    saved = recipe.to_dict()
    assert saved["data"] == {"dir": None, "mix": [{"dir": "/d/web", "weight": 7, "name": None},
                                                  {"dir": "/d/code", "weight": 3, "name": "c"}]}
    assert type(recipe).from_saved(saved, "config.yaml") == recipe
    assert load(TINY).data.entries() == [("tinyshakespeare-gpt2", "data/tinyshakespeare-gpt2", 1)]


def test_equal_weights_near_the_float_maximum_are_an_even_mix_not_a_weight_below_the_resolution():
    # Their plain sum is inf, which made each weight "below 1/65,536 of the total (inf)".
    recipe = load(TINY, ["data.dir=null", "data.mix=[{dir: /d/a, weight: 1e308}, {dir: /d/b, weight: 1e308}]"])
    assert Interleave([w for _, _, w in recipe.data.entries()]).shares == [0.5, 0.5]
    with pytest.raises(RecipeError, match=r"data.mix\[1\].weight 1e-300 is below 1/65,536 of the total"):
        load(TINY, ["data.dir=null", "data.mix=[{dir: /d/a, weight: 1e308}, {dir: /d/b, weight: 1e-300}]"])


def test_datasets_of_different_tokenizers_are_refused_naming_both(tmp_path, tiny_dataset, dictionaries):
    other = tmp_path / "other"
    shutil.copytree(dictionaries[0], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"] = {**manifest["tokenizer"], "name": "r50k_base"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    mix = f"data.mix=[{{dir: {tiny_dataset}, weight: 0.7}}, {{dir: {other}, weight: 0.3}}]"
    result = run_train(train_command(tmp_path / "run", tiny_dataset, "data.dir=null", mix), check_rc=None)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: data.mix: the datasets were tokenized differently: {tiny_dataset} has gpt2 (n_vocab "
                    f"50257, eot 50256), {other} has r50k_base (n_vocab 50257, eot 50256); a mixture needs one "
                    f"tokenizer: prepare them all with the same one"), last
    assert not (tmp_path / "run").exists()
    with pytest.raises(DatasetError, match=f"{tmp_path / 'missing'}: no manifest.json; not a finished dataset"):
        open_sources([("a", str(tiny_dataset), 1), ("b", str(tmp_path / "missing"), 1)])


# ---- real runs: 2 ranks (DeepSpeed, gloo) ------------------------------------------------------------------------

def mix_command(run_dir, tiny_dataset, dictionary, *sets, nproc=2):
    mix = f"data.mix=[{{dir: {tiny_dataset}, weight: 0.7, name: shakespeare}}, {{dir: {dictionary}, weight: 0.3}}]"
    return train_command(run_dir, tiny_dataset, "data.dir=null", mix, "deepspeed=configs/deepspeed/zero1.json",
                         "eval.every=2", "checkpoint.every=2", "sample.every=0", *sets, nproc=nproc,
                         port=free_port() if nproc > 1 else None)


@pytest.fixture(scope="module")
def mix_run(tmp_path_factory, tiny_dataset, dictionaries):
    """A finished 2-rank, 6-update ZeRO-1 run on Shakespeare 0.7 + a dictionary 0.3: checkpoints at 2, 4, 6."""
    run_dir = tmp_path_factory.mktemp("mix") / "run"
    out = run_train(mix_command(run_dir, tiny_dataset, dictionaries[0]))
    return run_dir, out.stdout


def test_a_mixture_run_logs_val_loss_per_dataset_and_its_epochs(mix_run, dictionaries):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir, stdout = mix_run
    name = dictionaries[0].name
    # 6 updates x 128 tokens / 32 = 24 windows: 0.7 x 24 / 9,701 epochs of Shakespeare.
    assert "data shakespeare" in stdout and "share 0.7, 0.00173 epochs of 9,701 windows" in stdout, stdout
    assert f"data {name}" in stdout and "data mix tolerance" in stdout
    train, val = read_metrics(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in val] == [2, 4, 6]
    for r in val:
        parts = r["val_loss/shakespeare"], r[f"val_loss/{name}"]
        assert r["val_loss"] == pytest.approx(0.7 * parts[0] + 0.3 * parts[1], rel=1e-12)
        assert parts[0] != parts[1]  # two datasets, two losses
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/val_loss/shakespeare")] == [2, 4, 6]
    assert [e.step for e in events.Scalars(f"val/val_loss/{name}")] == [2, 4, 6]
    state = read_client_state(run_dir / "checkpoints" / "global_step6")["loader"]
    assert [(d["name"], d["drawn"]) for d in state["mix"]] == [("shakespeare", 17), (name, 7)]  # 24 draws at 0.7/0.3
    # The report shows each dataset's val loss beside the overall one (one scored checkpoint is enough).
    (run_dir / "eval").mkdir(exist_ok=True)
    identity = checkpoint_identity(run_dir / "checkpoints" / "global_step6")  # a result of this run's checkpoint
    (run_dir / "eval" / "results.jsonl").write_text(json.dumps(
        {**identity, "tasks": {"hellaswag": {"acc": 0.25, "acc_norm": 0.25, "n_docs": 20}}}) + "\n")
    subprocess.run([PYTHON, "-m", "eval", "report", str(run_dir)], check=True, cwd=REPO, capture_output=True)
    report = (run_dir / "eval" / "report.md").read_text()
    assert f"| val loss | val loss {name} | val loss shakespeare | HellaSwag acc |" in report
    assert f"| {val[-1]['val_loss']:.4f} | {val[-1][f'val_loss/{name}']:.4f} | " \
           f"{val[-1]['val_loss/shakespeare']:.4f} |" in report


def test_a_mixture_resumes_on_2_ranks_with_bitwise_identical_losses(mix_run, tiny_dataset, dictionaries, tmp_path):
    # The run's checkpoint of update 2, alone in a fresh run directory: the resumed run must log updates 3..6 and
    # their val losses exactly as the uninterrupted one did (same windows, same order, same per-dataset split).
    source, _ = mix_run
    run_dir = tmp_path / "run"
    shutil.copytree(source / "checkpoints" / "global_step2", run_dir / "checkpoints" / "global_step2")
    shutil.copy(source / "format.json", run_dir / "format.json")
    (run_dir / "checkpoints" / "latest").write_text("global_step2")
    out = run_train(mix_command(run_dir, tiny_dataset, dictionaries[0]))
    assert "resuming from" in out.stdout and "global_step2 at step 2" in out.stdout
    train, val = read_metrics(run_dir)
    base_train, base_val = read_metrics(source)
    assert [(r["step"], r["loss"]) for r in train] == [(r["step"], r["loss"]) for r in base_train[2:]]
    keys = ("step", "val_loss", "val_loss/shakespeare", f"val_loss/{dictionaries[0].name}")
    assert [[r[k] for k in keys] for r in val] == [[r[k] for k in keys] for r in base_val[1:]]


def test_a_mixture_resumes_on_another_world_size_at_the_same_global_draw(mix_run, tiny_dataset, dictionaries,
                                                                       tmp_path):
    # The 2-rank checkpoint of update 4 on 1 rank (a universal checkpoint, ZeRO-1): updates 5 and 6 draw the same
    # 8 windows, so the loader state after them is the uninterrupted 2-rank run's.
    source, _ = mix_run
    run_dir = tmp_path / "run"
    shutil.copytree(source / "checkpoints" / "global_step4", run_dir / "checkpoints" / "global_step4")
    shutil.copy(source / "format.json", run_dir / "format.json")
    (run_dir / "checkpoints" / "latest").write_text("global_step4")
    out = run_train(mix_command(run_dir, tiny_dataset, dictionaries[0], nproc=1))
    assert "global_step4_universal at step 4" in out.stdout, out.stdout[-2000:]
    assert [r["step"] for r in read_metrics(run_dir)[0]] == [5, 6]
    resumed = read_client_state(run_dir / "checkpoints" / "global_step6")
    assert resumed["world_size"] == 1
    assert resumed["loader"] == read_client_state(source / "checkpoints" / "global_step6")["loader"]
