"""optim.name muon: our grouping, the combinations refused up front, and -- with real DeepSpeed engines on 2 CPU
ranks -- that every accepted ZeRO stage and precision applies Muon's orthogonalised momentum to the hidden matrices
and AdamW to the embeddings; exact resume after SIGKILL; a world-size change refused."""
import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT
from tests.conftest import PYTHON, REPO
from tests.fixtures_run import FAST, read_metrics, run_train, sigkill_after_step, train_command
from tests.fixtures_run import free_port
from train.optim import NS_METHOD, build, param_groups, uses_muon
from train.recipe import RecipeError, batch_plan, deepspeed_config, load

TINY = REPO / "configs/train/tiny-cpu.yaml"
HIDDEN = ("transformer.h.0.mlp.c_fc.weight", "transformer.h.0.attn.c_proj.weight",
          "transformer.h.0.attn.c_attn.weight")


def tiny_model() -> GPT:
    return GPT(GPTConfig.preset("tiny"))


# ---- grouping ------------------------------------------------------------------------------------------------

def test_muon_takes_the_block_matrices_and_adamw_the_embeddings_biases_and_gains():
    model = tiny_model()
    recipe = load(TINY, ["optim.name=muon"])
    groups = param_groups(model, recipe.optim)
    by_name = {n: g for g in groups for n in g["names"]}
    muon = sorted(n for n, g in by_name.items() if g["use_muon"])
    assert muon == sorted(f"transformer.h.{i}.{m}" for i in range(2) for m in
                          ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.bias",
                 "transformer.h.1.ln_2.weight", "transformer.ln_f.bias"):
        assert by_name[name]["use_muon"] is False and by_name[name]["lr"] == recipe.optim.max_lr, name
    assert by_name["transformer.wte.weight"]["weight_decay"] == 0.1  # AdamW's, decayed like any matrix
    assert by_name["transformer.ln_f.weight"]["weight_decay"] == 0.0
    assert by_name[muon[0]]["lr"] == 0.02 and by_name[muon[0]]["momentum"] == 0.95
    assert by_name[muon[0]]["weight_decay"] == 0.0
    assert len(by_name) == len(dict(model.named_parameters()))  # every parameter once (lm_head is wte)

    built = build(model, recipe.optim, "cpu", offload=False)
    assert built.peak_lrs == [3e-3, 3e-3, 0.02]  # tiny-cpu's max_lr for both AdamW groups, then Muon's
    assert all(p.use_muon is uses_muon(n) for n, p in model.named_parameters())  # set on every parameter
    # The names follow the optimizer's own order (MuonWithAuxAdam sorts its Muon group by size).
    params = dict(model.named_parameters())
    for names, group in zip(built.param_names, built.optimizer.param_groups):
        assert [params[n] for n in names] == group["params"]


def test_deepspeeds_own_guess_would_put_gpt2s_embeddings_on_muon():
    # What deepspeed.initialize does for a DeepSpeed-config "Muon" optimizer (which the recipe refuses): every
    # parameter of 2+ dimensions whose name lacks "embed" / "lm_head" -- GPT-2's wte and wpe included.
    from deepspeed import set_optimizer_flags
    model = tiny_model()
    set_optimizer_flags(SimpleNamespace(optimizer_name="muon", optimizer_params={}), model)
    guessed = {n for n, p in model.named_parameters() if p.use_muon}
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= guessed
    assert not any(uses_muon(n) for n in ("transformer.wte.weight", "transformer.wpe.weight"))


def test_adamw_stays_the_default_with_the_groups_it_always_had():
    model = tiny_model()
    recipe = load(TINY)
    assert recipe.optim.name == "adamw"
    built = build(model, recipe.optim, "cpu", offload=False)
    assert type(built.optimizer) is torch.optim.AdamW and built.peak_lrs == [3e-3, 3e-3]
    assert [sorted(k for k in g if k != "params") for g in param_groups(model, recipe.optim)] == \
        [["names", "weight_decay"]] * 2
    assert not any(hasattr(p, "use_muon") for p in model.parameters())
    decayed, plain = built.param_names
    assert all(dict(model.named_parameters())[n].dim() >= 2 for n in decayed) and "transformer.wte.weight" in decayed
    assert all(dict(model.named_parameters())[n].dim() < 2 for n in plain)


# ---- refused up front ----------------------------------------------------------------------------------------

def ds_for(*sets):
    recipe = load(TINY, ["optim.name=muon", *sets])
    return deepspeed_config(recipe, batch_plan(recipe, 1))


def test_muon_keys_are_validated():
    with pytest.raises(RecipeError, match="optim.name must be adamw or muon, got 'sgd'"):
        load(TINY, ["optim.name=sgd"])
    with pytest.raises(RecipeError, match=r"optim.muon_momentum must be a number in \[0, 1\), got 1"):
        load(TINY, ["optim.muon_momentum=1"])
    with pytest.raises(RecipeError, match="optim.muon_lr must be a non-negative number"):
        load(TINY, ["optim.muon_lr=-1"])


@pytest.mark.parametrize("sets, message", [
    (["deepspeed=configs/deepspeed/zero0.json", "precision=bf16"], "ZeRO-0 bf16 wrapper takes a dummy optimizer step"),
    (["deepspeed=configs/deepspeed/zero1.json", "precision=fp32"], "clips Muon's orthogonalised update here"),
    (["deepspeed=configs/deepspeed/zero2.json", "precision=bf16"], "clips Muon's orthogonalised update here"),
    (["deepspeed=configs/deepspeed/zero3.json", "precision=fp32"], "clips Muon's orthogonalised update here"),
    (["deepspeed=configs/deepspeed/zero3-offload.json", "optim.grad_clip=0"], "optimizer offload is not supported"),
])
def test_combinations_that_would_not_run_as_muon_are_refused_in_one_line(sets, message):
    with pytest.raises(RecipeError, match=message) as err:
        ds_for(*sets)
    assert "\n" not in str(err.value) and "optim.name muon with configs/deepspeed/" in str(err.value)


def test_accepted_combinations_and_what_the_trainer_fills_in(tmp_path):
    assert ds_for("deepspeed=configs/deepspeed/zero0.json", "precision=fp32")["gradient_clipping"] == 1.0
    assert ds_for("deepspeed=configs/deepspeed/zero1.json", "precision=bf16")["gradient_clipping"] == 1.0
    z3 = ds_for("deepspeed=configs/deepspeed/zero3.json", "optim.grad_clip=0")
    assert z3["zero_optimization"]["reduce_scatter"] is False  # DeepSpeed's ZeRO-3 Muon refuses reduce-scatter
    bad = tmp_path / "z3.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_scatter": True}}))
    with pytest.raises(RecipeError, match="needs zero_optimization.reduce_scatter false"):
        ds_for(f"deepspeed={bad}", "optim.grad_clip=0")
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"zero_optimization": {"stage": 1}, "optimizer": {"type": "Muon"}}))
    for optimizer in ("muon", "adamw"):  # a second source of truth for either
        with pytest.raises(RecipeError, match="has an 'optimizer' section; the recipe's optim"):
            recipe = load(TINY, [f"optim.name={optimizer}", f"deepspeed={named}"])
            deepspeed_config(recipe, batch_plan(recipe, 1))


# ---- the updates DeepSpeed applies, against a reference -----------------------------------------------------

# Every (ZeRO stage, precision) the recipe accepts with muon, at the clip it accepts there; 2 ranks, 2 micro
# batches per update (grad_accum 2), 2 updates.
CASES = {
    "zero0-fp32": ["deepspeed=configs/deepspeed/zero0.json", "precision=fp32", "optim.grad_clip=1.0"],
    "zero1-fp32": ["deepspeed=configs/deepspeed/zero1.json", "precision=fp32", "optim.grad_clip=0"],
    "zero1-bf16": ["deepspeed=configs/deepspeed/zero1.json", "precision=bf16", "optim.grad_clip=1.0"],
    "zero2-fp32": ["deepspeed=configs/deepspeed/zero2.json", "precision=fp32", "optim.grad_clip=0"],
    "zero2-bf16": ["deepspeed=configs/deepspeed/zero2.json", "precision=bf16", "optim.grad_clip=0"],
    "zero3-fp32": ["deepspeed=configs/deepspeed/zero3.json", "precision=fp32", "optim.grad_clip=0"],
    "zero3-bf16": ["deepspeed=configs/deepspeed/zero3.json", "precision=bf16", "optim.grad_clip=0"],
}


def newton_schulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of Keller Jordan's Muon write-up, in float64: X <- aX + (bA + cA^2)X
    with A = XX^T, (a, b, c) = (3.4445, -4.7750, 2.0315), on G scaled to Frobenius norm 1, wide side last."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double()
    tall = X.size(0) > X.size(1)
    X = X.T if tall else X
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def deepspeed_iteration(update: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's own Newton-Schulz of `update`, in the dtype it picks on this machine (fp16 where oneDNN has it)."""
    from deepspeed.runtime.zero.muon.original_muon import (zeropower_via_gram_newtonschulz,
                                                           zeropower_via_newtonschulz5)
    iterate = zeropower_via_gram_newtonschulz if NS_METHOD == "gram" else zeropower_via_newtonschulz5
    return iterate(update.float(), steps=5).double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def probes(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("muon_probe")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "tests.muon_probe", str(out / "probe.pt"), "--config", str(TINY)]
    for s in [f"data.dir={tiny_dataset}", *FAST, "optim.name=muon", "optim.warmup_steps=0",
              "batch.total_tokens=256", "eval.every=0", "sample.every=0", "log.tensorboard=false"]:
        cmd += ["--set", s]
    for name, sets in CASES.items():
        cmd += ["--case", f"{name}:" + ",".join([f"run_dir={out / name}", *sets])]
    # DeepSpeed's Newton-Schulz runs uncompiled here (TORCHDYNAMO_DISABLE, the switch train's own error names): the
    # replay checks the update against a float64 reference with tolerances far above what compiling changes in its
    # rounding, and compiling it for each matrix shape and precision took about a minute of the suite on a cold
    # inductor cache. muon_run below trains compiled.
    run_train(cmd, timeout=600, env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})
    return torch.load(out / "probe.pt", weights_only=False)


@pytest.mark.parametrize("case", list(CASES))
def test_hidden_matrices_get_newton_schulz_of_their_momentum_and_wte_gets_adamw(probes, case):
    """Replays the two updates from the gradients the tool recorded: Muon (Nesterov momentum, the reference
    iteration, the sqrt(max(1, rows/cols)) scale, decoupled weight decay) on the hidden matrices, AdamW on wte.

    Tolerance: fp32 1e-4 relative (measured <= 4e-5) where DeepSpeed iterates in fp32; on a CPU whose oneDNN has
    fp16 (DeepSpeed then iterates in fp16: Intel Xeons with AVX512-FP16/AMX) 4x the difference between DeepSpeed's
    own iteration of the exact update and the float64 reference (measured about 0.009 there). bf16: the gradient
    itself is rounded to bf16 at least once (accumulation, reduction), and Newton-Schulz amplifies that in the
    gradient's small singular directions: NS of the bf16-rounded gradient differs from NS of the exact one by
    1-5% for these matrices. The applied update must lie within 4x that difference (measured <= 2.5x). The
    failure modes it must exclude are far outside either: no orthogonalisation (plain momentum) is ~1.0 away, and
    DeepSpeed clipping the orthogonalised update (what the refusals prevent) scaled it by 0.025 (0.975 away)."""
    r = probes[case]
    o, bf16 = r["recipe"]["optim"], r["recipe"]["precision"] == "bf16"
    assert r["recipe"]["batch"]["total_tokens"] == 256 and o["name"] == "muon"  # grad_accum 2 on 2 ranks
    assert all(flag is uses_muon(n) for n, flag in r["use_muon"].items())  # our grouping survived initialize
    beta, clip = o["muon_momentum"], o["grad_clip"]
    momentum, adam = {}, {}
    for t, step in enumerate(r["steps"], start=1):
        coef = min(1.0, clip / (step["grad_norm"] + 1e-6)) if clip > 0 else 1.0  # DeepSpeed's clip rule
        lr_adam, lr_muon = step["lrs"][0], step["lrs"][-1]
        assert lr_muon / lr_adam == pytest.approx(o["muon_lr"] / o["max_lr"])  # one multiplier for both groups
        for name in HIDDEN:
            w0, w1 = step["before"][name].double(), step["after"][name].double()
            g = step["grad"][name].double() * coef
            m = beta * momentum.get(name, torch.zeros_like(g)) + (1 - beta) * g
            momentum[name] = m
            nesterov = (1 - beta) * g + beta * m
            scale = math.sqrt(max(1.0, w0.size(0) / w0.size(1)))
            ref = newton_schulz5(nesterov) * scale
            applied = (w0 * (1 - lr_muon * o["muon_weight_decay"]) - w1) / lr_muon
            rounding = rel(deepspeed_iteration(nesterov) * scale, ref)
            if bf16:
                g16 = g.float().bfloat16().double()
                sensitivity = rel(newton_schulz5(nesterov - (1 - beta ** 2) * (g - g16)) * scale, ref)
                tolerance = 4 * (sensitivity + rounding)
            else:
                tolerance = max(1e-4, 4 * rounding)
            assert rel(applied, ref) < tolerance, (case, t, name, rel(applied, ref), tolerance)
            assert rel(applied, nesterov * ref.norm() / nesterov.norm()) > 0.5  # it was orthogonalised
        name = "transformer.wte.weight"
        w0, w1 = step["before"][name].double(), step["after"][name].double()
        g = step["grad"][name].double() * coef
        s = adam.setdefault(name, {"m": torch.zeros_like(g), "v": torch.zeros_like(g)})
        b1, b2 = o["betas"]
        s["m"], s["v"] = b1 * s["m"] + (1 - b1) * g, b2 * s["v"] + (1 - b2) * g * g
        ref = (w0 * (1 - lr_adam * o["weight_decay"])
               - lr_adam * (s["m"] / (1 - b1 ** t)) / ((s["v"] / (1 - b2 ** t)).sqrt() + o["eps"]))
        assert rel(w1 - w0, ref - w0) < (1e-2 if bf16 else 1e-4), (case, t, rel(w1 - w0, ref - w0))


# ---- exact resume; world size --------------------------------------------------------------------------------

STEPS = 6
MUON_RUN = ["deepspeed=configs/deepspeed/zero2.json", "optim.name=muon", "optim.grad_clip=0", "schedule.kind=wsd",
            "schedule.decay_fraction=0.34", "optim.warmup_steps=2", f"schedule.max_steps={STEPS}",
            "checkpoint.every=2", "eval.every=2", "sample.every=0"]


def muon_command(run_dir, dataset):
    return train_command(run_dir, dataset, *MUON_RUN, nproc=2, port=free_port())


@pytest.fixture(scope="module")
def muon_run(tmp_path_factory, tiny_dataset):
    run_dir = tmp_path_factory.mktemp("muon_run") / "run"
    run_train(muon_command(run_dir, tiny_dataset))
    return run_dir


def test_wsd_lr_applied_to_both_groups(muon_run):
    # Independent of train.schedule: warmup 2, decay over the last round(0.34 x 6) = 2 updates, floor 0.1.
    train = read_metrics(muon_run)[0]
    factors = [0.5, 1.0, 1.0, 1.0, 1 - 0.5 * 0.9, 0.1]
    assert [r["lr"] for r in train] == pytest.approx([3e-3 * f for f in factors], rel=1e-12)
    assert [r["muon_lr"] for r in train] == pytest.approx([0.02 * f for f in factors], rel=1e-12)
    assert train[-1]["loss"] < train[0]["loss"]


def test_muon_sigkill_and_resume_log_bitwise_identical_losses(muon_run, tiny_dataset, tmp_path):
    baseline = {r["step"]: r["loss"] for r in read_metrics(muon_run)[0]}
    run_dir = tmp_path / "run"
    cmd = muon_command(run_dir, tiny_dataset)
    killed_at = sigkill_after_step(cmd, run_dir, 3)
    assert killed_at in (2, 4), killed_at
    run_train(cmd)
    lines = read_metrics(run_dir)[0]
    assert max(r["step"] for r in lines) == STEPS
    assert [r["step"] for r in lines].count(killed_at) >= 1
    for r in lines:  # the killed run's lines and the resumed run's alike
        assert r["loss"] == baseline[r["step"]], (r["step"], r["loss"], baseline[r["step"]])


def test_a_muon_checkpoint_on_another_world_size_is_refused_before_anything_runs(muon_run, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(muon_run / "checkpoints", run_dir / "checkpoints")
    shutil.copy(muon_run / "format.json", run_dir / "format.json")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    cmd = train_command(run_dir, tiny_dataset, *MUON_RUN[:-4], "schedule.max_steps=8", "checkpoint.every=2",
                        "eval.every=2", "sample.every=0") + ["--allow-change", "schedule.max_steps"]
    out = run_train(cmd, check_rc=1)
    assert ("was trained with Muon on 2 ranks; DeepSpeed 0.19.8 cannot convert Muon's optimizer state to a "
            "universal checkpoint, so resume it on 2 ranks (this is 1)") in out.stderr
    assert out.stderr.count("error:") == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # no _universal, nothing new
    assert not (run_dir / "metrics.jsonl").exists()
