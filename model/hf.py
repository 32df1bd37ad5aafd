"""Conversion between GPT and Hugging Face's GPT2LMHeadModel directories, with no network."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch

from common import files
from common.errors import PipelineError
from common.tokenizer import EOT_TOKEN, gpt2_bpe_files

from .config import ConfigError, GPTConfig

# Written into every export: what lets a later export replace this directory (with --force), and nothing else.
EXPORT_MARK = "export.json"

# HF's GPT-2 stores these as Conv1D (in, out); torch Linear wants (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Features of GPT2Config that this network does not implement: loading such a model would be silently wrong.
_UNSUPPORTED = {"scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "scale_attn_weights": True}


class HFFormatError(ConfigError):
    """An HF directory or state dict that does not describe a GPT-2 this code can build."""


class ExportError(PipelineError):
    """An export target that is not ours to replace."""


def config_from_hf(hf: dict) -> GPTConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise HFFormatError(f"config.json has model_type {hf.get('model_type')!r}, expected 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFFormatError(f"activation_function {act!r} is not GPT-2's tanh GELU")
    for key, ok in _UNSUPPORTED.items():
        if hf.get(key, ok) != ok:
            raise HFFormatError(f"config.json sets {key}={hf[key]!r}, which this GPT does not support")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise HFFormatError(f"config.json sets n_inner={hf['n_inner']}, but GPT-2's MLP is 4 * n_embd wide")
    if abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        raise HFFormatError(f"layer_norm_epsilon {hf['layer_norm_epsilon']} differs from GPT-2's 1e-5")
    return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                     n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])


def _read_state_dict(directory: Path) -> dict:
    st = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    binf = directory / "pytorch_model.bin"
    if st.exists():
        return _read_weights(st)
    if index.exists():
        weight_map = files.read_json(index, HFFormatError)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HFFormatError(f"{index}: its weight_map is not an object of file names")
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_weights(directory / shard))
        return state
    if binf.exists():
        return _read_weights(binf)
    raise HFFormatError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_weights(path: Path) -> dict:
    """One weights file, tensors only (pytorch_model.bin with weights_only: no pickled code runs); a truncated or
    foreign file is an HFFormatError naming it."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        said = next((line.strip() for line in str(exc).splitlines() if line.strip()
                     and not line.startswith(("Weights only load failed", "Please file an issue",
                                              "Check the documentation"))), "")
        raise HFFormatError(f"{path}: cannot read its weights ({type(exc).__name__}: {said[:200]})") from None


def _infer_config(state: dict) -> GPTConfig:
    if "transformer.wte.weight" not in state or "transformer.wpe.weight" not in state:
        raise HFFormatError("state dict has no transformer.wte.weight / transformer.wpe.weight: not a GPT-2")
    wte, wpe = state["transformer.wte.weight"], state["transformer.wpe.weight"]
    n_layer = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"transformer\.h\.(\d+)\.", k)))
    n_embd = wte.shape[1]
    if n_embd % 64:
        raise HFFormatError("a bare state dict does not say n_head; pass config=GPTConfig(...)")
    return GPTConfig(vocab_size=wte.shape[0], block_size=wpe.shape[0], n_layer=n_layer,
                     n_head=n_embd // 64, n_embd=n_embd,
                     bias="transformer.ln_f.bias" in state)


def load_hf(cls, source, config: GPTConfig | None = None, **overrides):
    if isinstance(source, dict):
        state = source
    else:
        directory = Path(source)
        if not directory.is_dir():
            raise HFFormatError(f"{directory} is not a directory")
        cfg_file = directory / "config.json"
        if not cfg_file.exists():
            raise HFFormatError(f"{directory}: no config.json, not a Hugging Face model directory")
        if config is None:
            config = config_from_hf(files.read_json(cfg_file, HFFormatError))
        state = _read_state_dict(directory)
    # A GPT2Model (no LM head) saves keys without the "transformer." prefix.
    state = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in state.items()}
    # Causal-mask buffers that older transformers versions saved: not parameters.
    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if config is None:
        config = _infer_config(state)
    if overrides:
        config = GPTConfig.from_dict({**config.to_dict(), **overrides})
    model = cls.empty(config)  # every weight is about to be replaced
    ours = model.state_dict()
    loaded = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            continue  # tied to wte
        if key not in ours:
            raise HFFormatError(f"unexpected weight {key!r}: not part of a GPT-2 of this shape")
        if key.endswith(_CONV1D):
            value = value.t()
        expected = ours[key].shape
        if key == "transformer.wte.weight" and config.padded_vocab_size:
            if value.shape[0] != config.vocab_size or value.shape[1] != expected[1]:
                raise HFFormatError(f"{key} has shape {tuple(value.shape)}, expected ({config.vocab_size}, {expected[1]})")
            padded = torch.zeros(expected, dtype=value.dtype)  # padding rows are never predicted: zeros will do
            padded[: config.vocab_size] = value
            value = padded
        if value.shape != expected:
            raise HFFormatError(f"{key} has shape {tuple(value.shape)}, expected {tuple(expected)} for {config}")
        # A caller's state dict is copied, so the new model never shares storage with its source.
        loaded[key] = value.to(ours[key].dtype, copy=isinstance(source, dict)).contiguous()
    missing = sorted(set(ours) - set(loaded) - {"lm_head.weight"})
    if missing:
        raise HFFormatError(f"missing weights: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    loaded["lm_head.weight"] = loaded["transformer.wte.weight"]
    return model.load_weights(loaded)


def hf_config_dict(config: GPTConfig) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "scale_attn_weights": True, "use_cache": True, "tie_word_embeddings": True,
        "bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "torch_dtype": "float32",
    }


def export_target(path, force: bool = False) -> bool:
    """Whether an export to `path` replaces what is there (an empty directory, or with force an earlier export).

    Anything else that exists is refused: an export never deletes what an export did not write.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return False
    if path.is_symlink() or not path.is_dir():
        raise ExportError(f"{path} exists and is not a directory; choose another --out")
    if not any(path.iterdir()):
        return True
    if not (path / EXPORT_MARK).is_file():
        raise ExportError(f"{path} is not empty and is not an earlier export (no {EXPORT_MARK}); nothing there is "
                          f"replaced: choose another --out")
    if not force:
        raise ExportError(f"{path} holds an earlier export; pass --force to replace it")
    return True


def save_hf(model, path, force: bool = False, source: dict | None = None) -> None:
    """Write config, safetensors weights and GPT-2 tokenizer files; the directory appears whole or not at all.

    `path` may be new, an empty directory, or (force) an earlier export; see export_target. Files get the
    permissions the umask gives, so another account (an inference server) can read them under umask 022.
    """
    from safetensors.torch import save_file
    config: GPTConfig = model.config
    out = Path(path)
    replace = export_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_dir(out, replace=replace) as tmp:
        state = {}
        for key, value in model.state_dict().items():
            if key == "lm_head.weight":
                continue  # tied: transformers re-ties it from wte on load
            value = value.detach().float().cpu()
            if key == "transformer.wte.weight":
                value = value[: config.vocab_size]
            if key.endswith(_CONV1D):
                value = value.t()
            state[key] = value.contiguous()
        # transformers' GPT-2 always has biases: a bias=False model is the same function with zero biases.
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and module.bias is None and name != "lm_head":
                state[f"{name}.bias"] = torch.zeros(module.weight.shape[0])
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files.chmod_to_umask(tmp / "model.safetensors")  # safetensors creates it owner-only
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN}, indent=2) + "\n")
        encoder_json, vocab_bpe = gpt2_bpe_files()
        shutil.copyfile(encoder_json, tmp / "vocab.json")
        shutil.copyfile(vocab_bpe, tmp / "merges.txt")
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": config.block_size,
            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "add_prefix_space": False, "add_bos_token": False}, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=2) + "\n")
        (tmp / EXPORT_MARK).write_text(json.dumps({"written_by": "gpt2-pipeline export", "source": source,
                                                   "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
