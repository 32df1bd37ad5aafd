"""Warm start (recipe key init_from, train.warm_start): a new run begins from another model's weights."""
import json
import subprocess

import yaml

from tests.conftest import PYTHON, REPO
from tests.fixtures_run import run_train, train_command
from tests.test_train_step import probe

# After build: the engine's weights against the export's, the padding rows against a fresh model's, and the first
# update's loss against the export's loss on the batches that update draws.
COMPARE = """
    from model.gpt import GPT
    export = sys.argv[-1].split("=", 1)[1]
    trainer.build()
    source = GPT.from_hf(export).state_dict()
    built = trainer.engine.module.state_dict()
    vocab = trainer.model_config.vocab_size
    torch.manual_seed(trainer.recipe.seed)
    fresh = GPT(trainer.model_config).state_dict()["transformer.wte.weight"]
    same = all(torch.equal(built[k][:vocab] if k.endswith("wte.weight") else built[k], v[:vocab] if
               k.endswith("wte.weight") else v) for k, v in source.items() if k != "lm_head.weight")
    padding = torch.equal(built["transformer.wte.weight"][vocab:], fresh[vocab:])
    rows = built["transformer.wte.weight"].shape[0]
    position = trainer.loader.state_dict()
    batches = [trainer.loader.next() for _ in range(trainer.plan.grad_accum)]
    trainer.loader.load_state_dict(position)
    model = GPT.from_hf(export).eval()
    with torch.no_grad():
        expected = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    record = trainer.train_step()
    print(json.dumps({"same": same, "padding": padding, "rows": rows, "loss": record["loss"],
                      "expected": expected, "step": trainer.step}))
"""


def export(run_dir, out) -> None:
    result = subprocess.run([PYTHON, "-m", "eval", "export", str(run_dir), "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_run_starts_from_an_exports_weights_and_its_loss(tiny_run, tiny_dataset, tmp_path):
    export(tiny_run, tmp_path / "hf")
    # The recipe pads the embedding (as the GPU recipes do) where the export holds the 50,257 real rows.
    out = probe(COMPARE, tmp_path / "run", tiny_dataset, "schedule.max_steps=1", "model.padded_vocab_size=50304",
                f"init_from={tmp_path / 'hf'}")
    assert out["same"] and out["padding"] and out["rows"] == 50304 and out["step"] == 1
    assert abs(out["loss"] - out["expected"]) < 1e-5 * out["expected"], out


def test_a_run_dir_seeds_a_new_run_and_the_recipe_records_it(tiny_run, tiny_dataset, tmp_path):
    result = run_train(train_command(tmp_path / "run", tiny_dataset, "schedule.max_steps=1", "eval.every=0",
                                     "sample.every=0", f"init_from={tiny_run}"))
    assert f"checkpoint {tiny_run / 'checkpoints/global_step6'} (step 6" in result.stdout  # the startup table
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert saved["init_from"] == str(tiny_run)
    lines = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    first = yaml.safe_load((tiny_run / "metrics.jsonl").read_text().splitlines()[0])
    assert lines[0]["loss"] < first["loss"] - 1  # far below a fresh model's first loss (~10.8)


def test_a_source_of_another_shape_is_refused_in_one_line(tiny_run, tiny_dataset, tmp_path):
    result = run_train(train_command(tmp_path / "run", tiny_dataset, "model.n_layer=3", f"init_from={tiny_run}"),
                       check_rc=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert (f"error: init_from {tiny_run} holds a model of shape n_layer 2, n_head 4, n_embd 128, block_size 256, vocab_size "
            f"50257; the recipe's model is n_layer 3, n_head 4") in result.stderr
    assert not (tmp_path / "run").exists()
    # The shape is checked from the source's config before its weights are read (DeepSpeed's consolidation drew a
    # progress bar over stderr before the error).
    assert "Loading checkpoint shards" not in result.stderr, result.stderr


def test_a_shorter_block_size_takes_the_sources_first_positions_and_a_longer_one_is_refused(
        tiny_run, tiny_dataset, tmp_path):
    # As nanoGPT's crop_block_size: fine-tuning at a shorter context keeps every weight but the unused positions.
    code = """
        from train.rundir.consolidate import load_model
        trainer.build()
        source = load_model(sys.argv[-1].split("=", 1)[1])[0].state_dict()
        built = trainer.engine.module.state_dict()
        wpe = built["transformer.wpe.weight"]
        same = all(torch.equal(built[k], v) for k, v in source.items() if k not in ("lm_head.weight",
                   "transformer.wpe.weight"))
        first = torch.equal(wpe, source["transformer.wpe.weight"][:64])  # before the update changes it in place
        record = trainer.train_step()
        print(json.dumps({"rows": wpe.shape[0], "wpe": first, "same": same, "what": trainer.init_source,
                          "finite": record["loss"] < 20}))
    """
    out = probe(code, tmp_path / "run", tiny_dataset, "schedule.max_steps=1", "model.block_size=64",
                f"init_from={tiny_run}")
    assert out["rows"] == 64 and out["wpe"] and out["same"] and out["finite"], out
    assert out["what"].endswith("its 256 positions cropped to block_size 64"), out
    result = run_train(train_command(tmp_path / "longer", tiny_dataset, "model.block_size=512",
                                     f"init_from={tiny_run}"), check_rc=1)
    assert "block_size 256, vocab_size 50257; the recipe's model is n_layer 2, n_head 4, n_embd 128, block_size 512" \
        in result.stderr and "has positions it never learnt" in result.stderr, result.stderr
    assert not (tmp_path / "longer").exists()
