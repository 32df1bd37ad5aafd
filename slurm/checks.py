"""Everything submit checks before the first stage runs or the first sbatch, in this process, with the stages' own
code: the recipe (train.recipe, for the job's world size), the mixture (train.data's tokenizer rule), an existing
dataset (prep tokenize's reuse rule) and an existing run (train.recipe's resume rule). Each failure is one
ConfigError line; nothing is written.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from common import hellaswag
from common.errors import PipelineError

from .config import ConfigError, Pipeline
from .plan import sbatch_found

MANIFEST = "manifest.json"


def check_inputs(p: Pipeline, slurm: bool, dry_run: bool) -> None:
    s = p.site
    if slurm:
        if p.SITE is None:
            raise ConfigError(f"{p.file} sets no SITE: copy slurm/site.env.example to slurm/site.env, edit it, set "
                              f"SITE=slurm/site.env")
        for key in ("SITE_GPUS_PER_NODE", "SITE_CPUS_PER_NODE", "SITE_SIGNAL_SECONDS"):
            if getattr(s, key) is None:
                raise ConfigError(f"{p.SITE}: {key} must be a whole number, got ''")
        if s.SITE_GPUS_PER_NODE and p.GPUS_PER_NODE > s.SITE_GPUS_PER_NODE:
            raise ConfigError(f"GPUS_PER_NODE={p.GPUS_PER_NODE} but the site's nodes have {s.SITE_GPUS_PER_NODE} GPUs")
        if s.SITE_CPUS_PER_NODE and p.PREP_WORKERS > s.SITE_CPUS_PER_NODE:  # a job no node can hold: pending forever
            raise ConfigError(f"PREP_WORKERS={p.PREP_WORKERS} but the site's nodes have {s.SITE_CPUS_PER_NODE} CPUs "
                              f"(each tokenize task asks for PREP_WORKERS CPUs on one node)")
        if not dry_run and not sbatch_found():
            raise ConfigError("sbatch not found: is this a Slurm login node? (or use --local)")
    elif p.NODES > 1:
        raise ConfigError(f"--local runs on one machine, but NODES={p.NODES}")
    if not p.TRAIN_RECIPE.is_file():
        raise ConfigError(f"training recipe not found: {p.TRAIN_RECIPE}")
    if not p.HELLASWAG.is_file():
        raise ConfigError(f"HellaSwag file not found: {p.HELLASWAG} (write it on a machine with internet: python -m "
                          f"prep eval-data --out {p.HELLASWAG.parent})")
    try:  # every doc, well under a second: a bad one would otherwise stop the eval job after prep and training
        hellaswag.check_file(p.HELLASWAG)
    except PipelineError as exc:
        raise ConfigError(f"HELLASWAG: {exc}") from None
    if p.PREP_SOURCE == "local":
        for path in p.tokenize_inputs():
            if not path.exists():
                raise ConfigError(f"PREP_INPUT not found: {path}")


def check_mix(p: Pipeline) -> None:
    """train reads DATASET_DIR and datasets prepared before; this pipeline prepares only DATASET_DIR, so it must be
    one of the mix, and every other one finished now: a missing one would fail the train job after hours of prep."""
    if not p.TRAIN_MIX:
        return
    dirs = [e.dir for e in p.TRAIN_MIX]
    if p.DATASET_DIR.resolve() not in [d.resolve() for d in dirs]:
        raise ConfigError(f"TRAIN_MIX does not list DATASET_DIR ({p.DATASET_DIR}), the dataset this pipeline "
                          f"prepares: add it as an entry (\"$DATASET_DIR=WEIGHT\")")
    for d in dirs:
        if d.resolve() != p.DATASET_DIR.resolve() and not (d / MANIFEST).exists():
            raise ConfigError(f"TRAIN_MIX: {d} is not a finished dataset (no manifest.json); this pipeline prepares "
                              f"only DATASET_DIR, so prepare {d} first (python -m prep tokenize --input ... --out {d})")


def check_mix_tokenizers(entries) -> None:
    """The datasets of a mixture that exist share one tokenizer, as train requires; one still to be prepared (the
    pipeline's own) will have prep's, so the others must have that one too: else train would refuse the mixture
    only after the prep stages had run."""
    from common import tokenizer
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


def check_recipe(p: Pipeline):
    """The recipe train will get (the pipeline's --set values), through train's own loader, for the job's world
    size: keys, model shape, DeepSpeed file, a batch that divides over NODES x GPUS_PER_NODE processes."""
    from train.recipe import batch_plan, deepspeed_config, load
    world = p.NODES * p.GPUS_PER_NODE
    try:
        recipe = load(p.TRAIN_RECIPE, p.train_sets())
        plan = batch_plan(recipe, world)
        deepspeed_config(recipe, plan)
        if recipe.data.mix:
            check_mix_tokenizers(recipe.data.entries())
    except PipelineError as exc:
        raise ConfigError(f"recipe {p.TRAIN_RECIPE} fails for {p.NODES} node(s) x {p.GPUS_PER_NODE} process(es): "
                          f"{exc}") from None
    print(f"recipe ok: {plan.world_size} processes x micro_batch {plan.micro_batch} x seq_len {plan.seq_len} "
          f"x grad_accum {plan.grad_accum} = {plan.total_tokens} tokens/step, {plan.max_steps} steps")
    return recipe


def check_resume(p: Pipeline, recipe) -> None:
    """A RUN_DIR with checkpoints is resumed by train, which refuses a recipe that differs from the run's in keys
    TRAIN_ALLOW_CHANGE does not name: said here, before anything is submitted, not by the train job."""
    from train import paths, recipe as recipes
    from train.rundir import RunDir, read_recipe
    from train.rundir.checkpoints import complete_tags
    run = RunDir(p.RUN_DIR)
    tags = complete_tags(run.checkpoints) if run.checkpoints.is_dir() else []
    if not tags or not run.config.exists():
        return
    recipe = paths.absolute(recipe)   # as the trainer compares it
    try:
        changes = recipes.check_resume(read_recipe(run.path), recipe, list(p.TRAIN_ALLOW_CHANGE), tags[-1])
    except PipelineError as exc:
        raise ConfigError(f"RUN_DIR {p.RUN_DIR} holds a run to resume: {exc} (pipeline key TRAIN_ALLOW_CHANGE)") \
            from None
    print(f"resuming {p.RUN_DIR} from {tags[-1].name}" +
          "".join(f"; {k} {a!r} -> {b!r} (TRAIN_ALLOW_CHANGE)" for k, (a, b) in changes.items()))


def dataset_ready(p: Pipeline) -> bool:
    """True when DATASET_DIR is already a finished dataset made with this pipeline's recipe (no prep stages). prep
    itself decides: a tokenize rerun on a finished dataset does nothing, and refuses a different recipe."""
    if not (p.DATASET_DIR / MANIFEST).exists():
        return False
    inputs = p.tokenize_inputs()
    gone = [path for path in inputs if not path.exists()]
    if gone:
        print(f"note: reusing {p.DATASET_DIR}; its inputs ({gone[0]}) are gone, so its recipe is not re-checked")
        return True
    import prep.__main__ as prep_cli
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        status = prep_cli.main(["tokenize", "--input", *map(str, inputs), "--out", str(p.DATASET_DIR),
                                *p.tokenize_flags()])
    if status != 0:
        lines = said.getvalue().splitlines()
        line = next((x for x in lines if x.startswith("error: ")), lines[-1] if lines else f"exit {status}")
        raise ConfigError(f"dataset {p.DATASET_DIR} exists but does not match this pipeline: "
                          f"{line.removeprefix('error: ')}")
    print(f"reusing dataset {p.DATASET_DIR} (same recipe): no prep jobs")
    return True
