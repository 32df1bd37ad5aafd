"""DeepSpeed's ZeRO-0 bf16 wrapper takes one optimizer step on zero gradients at start-up; it must leave no trace."""
import subprocess
import textwrap

from tests.conftest import PYTHON, REPO

PROBE = textwrap.dedent("""
    import sys
    import torch
    from model.gpt import GPT
    from train.recipe import load
    from train.trainer import Trainer
    recipe = load(sys.argv[1], sys.argv[2:])
    trainer = Trainer(recipe)
    trainer.build()
    wrapper = trainer.engine.optimizer
    assert type(wrapper).__name__ in ("FP16_UnfusedOptimizer", "FP16_Optimizer"), type(wrapper).__name__
    steps = [s.get("step") for s in trainer.optimizer.state.values()]
    torch.manual_seed(recipe.seed)
    init = dict(GPT(trainer.model_config).named_parameters())
    names = {id(p): n for n, p in trainer.engine.module.named_parameters()}
    moved = [names[id(low)] for lows, highs in zip(wrapper.fp16_groups, wrapper.fp32_groups)
             for low, high in zip(lows, highs)
             if not torch.equal(high.float(), init[names[id(low)]].detach().to(torch.bfloat16).float())]
    print("state steps", steps, "moved", moved[:3])
    sys.exit(1 if steps or moved else 0)
""")


def test_zero0_bf16_start_up_step_neither_counts_nor_decays(tiny_dataset, tmp_path):
    sets = [f"run_dir={tmp_path / 'run'}", f"data.dir={tiny_dataset}", "deepspeed=configs/deepspeed/zero0.json",
            "precision=bf16", "optim.weight_decay=0.1", "batch.seq_len=32", "batch.micro_batch=2",
            "batch.total_tokens=64", "schedule.max_steps=2"]
    result = subprocess.run([PYTHON, "-c", PROBE, str(REPO / "configs/train/tiny-cpu.yaml"), *sets], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
