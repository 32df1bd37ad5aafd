"""Check a training recipe for a job's world size without training: what submit.sh runs before submitting.

Uses the trainer's own recipe code (train.recipe), so a recipe passes here exactly when `python -m train` would
accept it: known keys, a valid model shape, a DeepSpeed file that exists, and a total batch that divides evenly
over micro_batch x seq_len x (nodes x GPUs per node). For a mixture (data.mix), the datasets already prepared must
share one tokenizer, as train requires when it opens them (one the pipeline is still to prepare is not read).

    python slurm/check_recipe.py --config configs/train/tiny-cpu.yaml --world-size 2 [--set key=value ...]
"""
import sys
from pathlib import Path

from common import cli, tokenizer
from prep.reader import MANIFEST
from train.recipe import batch_plan, deepspeed_config, load


def check_mix_tokenizers(entries) -> None:
    """The datasets of a mixture that exist share one tokenizer, as train requires; one still to be prepared (the
    pipeline's own) will have prep's, so the others must have that one too: else train would refuse the mixture
    only after the prep stages had run."""
    from train.data import DatasetError, open_sources, tokenizer_of  # torch: only a mixture needs it here
    prepared = [e for e in entries if (Path(e[1]) / MANIFEST).exists()]
    pending = [e[1] for e in entries if e not in prepared]
    if not prepared:
        return
    first = open_sources(prepared)[0].dataset
    prep_makes = (tokenizer.ENCODING_NAME, tokenizer.N_VOCAB, tokenizer.EOT_TOKEN)
    if pending and tokenizer_of(first) != prep_makes:
        name, n_vocab, eot = tokenizer_of(first)
        raise DatasetError(f"data.mix: the datasets would be tokenized differently: {first.path} has {name} "
                           f"(n_vocab {n_vocab}, eot {eot}), {pending[0]} is still to be prepared, by prep with "
                           f"{prep_makes[0]} (n_vocab {prep_makes[1]}, eot {prep_makes[2]}); a mixture needs one "
                           f"tokenizer")


def check(args) -> int:
    recipe = load(args.config, args.set)
    plan = batch_plan(recipe, args.world_size)
    deepspeed_config(recipe, plan)
    if recipe.data.mix:
        check_mix_tokenizers(recipe.data.entries())
    print(f"recipe ok: {plan.world_size} processes x micro_batch {plan.micro_batch} x seq_len {plan.seq_len} "
          f"x grad_accum {plan.grad_accum} = {plan.total_tokens} tokens/step, {plan.max_steps} steps")
    return 0


def main(argv=None) -> int:
    p = cli.Parser(prog="slurm/check_recipe.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="configs/train/NAME.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, as for train")
    p.add_argument("--world-size", type=cli.positive_int, required=True, help="nodes x GPUs (processes) per node")
    p.set_defaults(run=check)
    return cli.run(p, argv)


if __name__ == "__main__":
    sys.exit(main())
