"""Warm start (recipe key init_from): a new run's initial weights taken from another model.

init_from names a Hugging Face GPT-2 directory (OpenAI's gpt2 downloaded from the Hub, or an `eval export`), or
another run's checkpoint: a tag dir, a checkpoints dir or a run dir (its newest complete checkpoint), read as
train.rundir.consolidate reads it for eval (the fp32 master weights). Only the weights are taken: the optimizer
state, the data order and the step start fresh. The trainer reads the source on every rank at step 0 of a new run,
before the engine is built; a resumed run continues its own checkpoint and never reads init_from again.
"""
from __future__ import annotations

import torch

from common.errors import PipelineError

# What must agree between the source and the recipe's model; dropout is a training choice, and padded_vocab_size
# only adds rows the loss never predicts (the real rows are copied, the padding keeps the model's own init).
# block_size may be smaller than the source's: the first block_size position embeddings are taken, as nanoGPT's
# crop_block_size does to fine-tune GPT-2 at a shorter context; a larger one has positions no source learnt.
SHAPE = ("n_layer", "n_head", "n_embd", "vocab_size")


class WarmStartError(PipelineError):
    """An init_from source that cannot seed this recipe's model; the message names both sides."""


def describe(config) -> str:
    return ", ".join(f"{key} {getattr(config, key)}" for key in (*SHAPE[:3], "block_size", SHAPE[3]))


def load(path, config) -> tuple[dict, str]:
    """The source's weights as {parameter name: fp32 tensor} for a model of `config` (model.config.GPTConfig),
    and one line saying what they are; a WarmStartError when the source is unreadable or of another shape."""
    from train.rundir.checkpoints import CheckpointError
    from train.rundir.consolidate import load_model

    def check_shape(have) -> None:  # before the weights are read: a mismatch costs no loading
        if any(getattr(have, key) != getattr(config, key) for key in SHAPE) or config.block_size > have.block_size:
            longer = (f" (a block_size above the source's {have.block_size} has positions it never learnt)"
                      if all(getattr(have, key) == getattr(config, key) for key in SHAPE) else "")
            raise WarmStartError(f"init_from {path} holds a model of shape {describe(have)}; the recipe's model is "
                                 f"{describe(config)}{longer}: make the model section match, or start from scratch")

    try:
        source, meta = load_model(path, check=check_shape)
    except CheckpointError as exc:
        raise WarmStartError(f"init_from {path}: {exc}") from None
    have = source.config
    state = {key: value.detach() for key, value in source.state_dict().items() if key != "lm_head.weight"}
    cropped = config.block_size < have.block_size
    if cropped:
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:config.block_size]
    # An HF directory always carries biases (an export writes zeros for a bias-free model): bias-free recipes take
    # them only when they are zero, and a biased recipe needs a source that has them.
    biases = {key for key in state if key.endswith(".bias")}
    if not config.bias and any(state[key].any() for key in biases):
        raise WarmStartError(f"init_from {path} has non-zero biases; the recipe's model has bias: false")
    if config.bias and not biases:
        raise WarmStartError(f"init_from {path} has no biases; the recipe's model has bias: true")
    if not config.bias:
        state = {key: value for key, value in state.items() if key not in biases}
    if meta["kind"] == "hf":
        what = f"Hugging Face directory {meta['path']}"
    else:
        what = f"checkpoint {meta['path']} (step {meta['step']}, {meta['tokens_seen']:,} tokens)"
    if cropped:
        what += f", its {have.block_size} positions cropped to block_size {config.block_size}"
    return state, what


@torch.no_grad()
def apply(model, state: dict) -> None:
    """Copy the source weights into a freshly built model.GPT of the matching shape; the embedding's padding rows
    (model.padded_vocab_size) keep the values the model was initialised with."""
    vocab = model.config.vocab_size
    target = {key: value for key, value in model.state_dict().items() if key != "lm_head.weight"}  # tied to wte
    if set(target) != set(state):
        missing, extra = sorted(set(target) - set(state)), sorted(set(state) - set(target))
        raise WarmStartError(f"init_from weights do not match the model: missing {missing[:3]}, extra {extra[:3]}")
    for key, value in target.items():
        source = state[key]
        if key == "transformer.wte.weight":
            value[:vocab].copy_(source[:vocab])
        else:
            value.copy_(source)
