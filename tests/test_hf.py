"""Hugging Face parity: randomly initialised transformers GPT-2 models, imported and exported, offline, in fp32.

Shapes: a small one (fast, every path) and the real gpt2 shape (124M), on one short sequence.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from common import tokenizer
from model.config import GPTConfig
from model.gpt import GPT
from model.hf import HFFormatError

TOLERANCE = 1e-4  # max abs logits difference, fp32
SMALL = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)
TEXT = "Hello, I'm a language model, and I can\n\tcount: 1 2 3 ... naïve café 東京 <|endoftext|> done."


def hf_model(shape, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**shape)).eval()


def tokens(n=24):
    return torch.tensor([tokenizer.encode(TEXT)[:n]])


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def greedy_equal(ours, hf, idx, n):
    mine = ours.generate(idx, n, top_k=1)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False,
                         pad_token_id=tokenizer.EOT_TOKEN, eos_token_id=None)
    assert mine.tolist() == theirs.tolist()


@pytest.fixture(scope="module")
def small_hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("small_hf")
    hf_model(SMALL).save_pretrained(path)
    return path


def test_import_small_safetensors(small_hf_dir):
    hf = GPT2LMHeadModel.from_pretrained(small_hf_dir).eval()
    ours = GPT.from_hf(small_hf_dir).eval()
    assert ours.config == GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=64)
    assert max_diff(our_logits(ours, tokens()), hf_logits(hf, tokens())) <= TOLERANCE
    greedy_equal(ours, hf, tokens(8), 16)


def test_import_small_pytorch_bin_with_old_mask_buffers(small_hf_dir, tmp_path):
    """The .bin layout older transformers wrote, including the causal-mask buffers they saved."""
    state = load_file(str(small_hf_dir / "model.safetensors"))
    for i in range(SMALL["n_layer"]):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "config.json").write_text((small_hf_dir / "config.json").read_text())
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = GPT.from_hf(tmp_path).eval()
    hf = GPT2LMHeadModel.from_pretrained(small_hf_dir).eval()
    assert max_diff(our_logits(ours, tokens()), hf_logits(hf, tokens())) <= TOLERANCE


def test_import_from_state_dict(small_hf_dir):
    hf = GPT2LMHeadModel.from_pretrained(small_hf_dir).eval()
    ours = GPT.from_hf(hf.state_dict(), config=GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=64)).eval()
    assert max_diff(our_logits(ours, tokens()), hf_logits(hf, tokens())) <= TOLERANCE


def test_export_small_loads_in_transformers_and_autotokenizer(tmp_path):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=64)).eval()
    ours.save_hf(tmp_path / "out")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert max_diff(our_logits(ours, tokens()), hf_logits(hf, tokens())) <= TOLERANCE
    greedy_equal(ours, hf, tokens(8), 16)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok(TEXT)["input_ids"] == tokenizer.get_encoding().encode(TEXT, allowed_special="all")
    assert hf_tok.eos_token_id == tokenizer.EOT_TOKEN
    assert hf_tok.decode(tokenizer.encode(TEXT)) == TEXT


def test_export_padded_vocab_is_exact(tmp_path):
    """Padding rows (50257..50303) exist only in memory: logits, export and re-import are the real vocabulary."""
    torch.manual_seed(2)
    ours = GPT(GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=64, padded_vocab_size=50304)).eval()
    assert ours.transformer.wte.weight.shape[0] == 50304
    ours.save_hf(tmp_path / "out")
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert state["transformer.wte.weight"].shape == (50257, 64)
    assert torch.equal(state["transformer.wte.weight"], ours.transformer.wte.weight[:50257])
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    logits = our_logits(ours, tokens())
    assert logits.shape[-1] == 50257
    assert max_diff(logits, hf_logits(hf, tokens())) <= TOLERANCE
    again = GPT.from_hf(tmp_path / "out", padded_vocab_size=50304).eval()
    assert torch.equal(our_logits(again, tokens()), logits)


def test_export_without_biases_is_exact(tmp_path):
    """transformers' GPT-2 always has biases: a bias=False model exports with zero biases, the same function."""
    torch.manual_seed(3)
    ours = GPT(GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=64, bias=False)).eval()
    ours.save_hf(tmp_path / "out")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert max_diff(our_logits(ours, tokens()), hf_logits(hf, tokens())) <= TOLERANCE


def test_gpt2_shape_import_export_generate(tmp_path):
    hf = hf_model(GPT2)
    hf.save_pretrained(tmp_path / "in")
    del hf
    ours = GPT.from_hf(tmp_path / "in").eval()
    assert ours.num_params() == 124_439_808
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "in").eval()
    assert sum(p.numel() for p in hf.parameters()) == 124_439_808
    idx = tokens(16)
    reference = hf_logits(hf, idx)
    assert max_diff(our_logits(ours, idx), reference) <= TOLERANCE
    greedy_equal(ours, hf, idx[:, :8], 4)
    del hf
    ours.save_hf(tmp_path / "out")
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert max_diff(hf_logits(exported, idx), reference) <= TOLERANCE


def test_shape_mismatch_names_the_weight(small_hf_dir, tmp_path):
    config = json.loads((small_hf_dir / "config.json").read_text())
    config["n_embd"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(str(small_hf_dir / "model.safetensors"))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFFormatError, match=r"\.weight has shape|\.bias has shape"):
        GPT.from_hf(tmp_path)


def test_unsupported_hf_features_are_refused(small_hf_dir, tmp_path):
    config = json.loads((small_hf_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").symlink_to(small_hf_dir / "model.safetensors")
    for key, value in (("scale_attn_weights", False), ("n_inner", 100), ("activation_function", "relu")):
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(HFFormatError, match=key):
            GPT.from_hf(tmp_path)
