"""GPT and GPTConfig: exact parameter counts, GPT-2 initialisation, dropout, padding, bias=False, config errors."""
import math

import pytest
import torch

from model.config import ConfigError, GPTConfig
from model.gpt import GPT
from model.info import parameter_table

SMALL = dict(block_size=32, vocab_size=300, n_layer=3, n_head=4, n_embd=32)


@pytest.mark.parametrize("preset,total", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                          ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_exact_parameter_counts(preset, total):
    config = GPTConfig.preset(preset)
    table = parameter_table(config)  # counts a GPT built on the meta device
    assert table["total"] == total
    assert sum(row["params"] for row in table["components"]) == total
    C, L = config.n_embd, config.n_layer
    by_name = {row["name"]: row for row in table["components"]}
    assert by_name["attention (c_attn, c_proj)"]["per_block"] == 4 * C * C + 4 * C
    assert by_name["MLP (c_fc, c_proj)"]["per_block"] == 8 * C * C + 5 * C
    assert by_name["LM head (tied to wte)"]["params"] == 0
    if preset == "gpt2":
        # Without the Linear layers' biases (3C + C + 4C + C per block) GPT-2 has 124,356,864 parameters; see
        # docs/model.md for the seed text's 124,396,864, which no subset of GPT-2's tensors adds up to.
        assert total - L * 9 * C == 124_356_864
        assert 124_396_864 % C != 0 and total % C == 0


@pytest.mark.parametrize("overrides", [{}, {"bias": False}, {"padded_vocab_size": 320}])
def test_table_matches_a_real_model(overrides):
    config = GPTConfig(**SMALL, **overrides)
    model = GPT(config)
    table = parameter_table(config)
    assert table["total"] == model.num_params()
    assert table["padding"] == (config.embedding_rows - config.vocab_size) * config.n_embd
    assert model.num_params(include_padding=True) == sum(p.numel() for p in model.parameters())


def test_gpt2_initialisation():
    torch.manual_seed(0)
    config = GPTConfig(block_size=256, vocab_size=2048, n_layer=6, n_head=4, n_embd=256)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / math.sqrt(2 * config.n_layer), rel=0.05), name
        elif name.endswith("weight") and p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif "ln" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
        else:
            assert torch.all(p == 0), name


def test_empty_model_takes_loaded_weights_and_leaves_init_alone():
    """GPT.empty: shapes only, on meta, tied; load_weights gives the source's function; init outside is untouched."""
    config = GPTConfig(**SMALL, padded_vocab_size=320)
    torch.manual_seed(0)
    source = GPT(config).eval()
    empty = GPT.empty(config)
    assert all(p.is_meta for p in empty.parameters())
    assert {n: p.shape for n, p in empty.named_parameters()} == {n: p.shape for n, p in source.named_parameters()}
    loaded = empty.load_weights({k: v.clone() for k, v in source.state_dict().items()}).eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert not any(p.is_meta for p in loaded.parameters())
    idx = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], source(idx)[0])
    after = GPT(config)  # the skipped init is only inside GPT.empty
    assert after.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(after.transformer.ln_f.weight == 1)


def test_dropout_on_embeddings_attention_and_residuals():
    config = GPTConfig(**SMALL, dropout=0.5)
    model = GPT(config)
    dropouts = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == ["transformer.drop"] + [
        name for i in range(config.n_layer) for name in (f"transformer.h.{i}.attn.resid_dropout",
                                                         f"transformer.h.{i}.mlp.dropout")]
    assert all(block.attn.dropout == 0.5 for block in model.transformer.h)  # SDPA's dropout_p in training
    idx = torch.randint(0, config.vocab_size, (2, 16))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_attention_dropout_alone_changes_training_outputs():
    model = GPT(GPTConfig(**SMALL, dropout=0.5))
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # leave only the dropout inside scaled_dot_product_attention
    idx = torch.randint(0, 300, (2, 16))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


def test_causal():
    model = GPT(GPTConfig(**SMALL)).eval()
    idx = torch.randint(0, 300, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 300
    a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_packed_sequence_matches_separate_ones():
    """Two continuations packed after one shared context see exactly what they would see alone."""
    model = GPT(GPTConfig(**SMALL)).eval()
    context, first, second = torch.randint(0, 300, (3,)), torch.randint(0, 300, (4,)), torch.randint(0, 300, (6,))
    packed = torch.cat([context, first, second])[None]
    segment = torch.tensor([0] * 3 + [1] * 4 + [2] * 6)
    positions = torch.cat([torch.arange(3), torch.arange(3, 7), torch.arange(3, 9)])[None]
    causal = torch.ones(13, 13, dtype=torch.bool).tril()
    mask = causal & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    with torch.no_grad():
        out = model.features(packed, positions, mask[None, None])[0]
        alone_first = model.features(torch.cat([context, first])[None])[0]
        alone_second = model.features(torch.cat([context, second])[None])[0]
    torch.testing.assert_close(out[:7], alone_first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[7:], alone_second[3:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="position 32 exceeds block_size 32"):
        model.features(packed, positions + 24, mask[None, None])


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    idx, targets = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    grads, saved = [], []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        count = [0]

        def keep(tensor, count=count):
            count[0] += 1
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = model(idx, targets)[1]
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        saved.append(count[0])
    assert saved[1] < saved[0] / 2, f"tensors kept for backward: {saved[0]} plain, {saved[1]} checkpointed"
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, atol=1e-6, rtol=1e-5)


def test_padding_never_leaks():
    torch.manual_seed(0)
    padded = GPT(GPTConfig(**SMALL, padded_vocab_size=320))
    plain = GPT(GPTConfig(**SMALL))
    state = padded.state_dict()
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:300]
    state["lm_head.weight"] = state["transformer.wte.weight"]
    plain.load_state_dict(state)
    idx = torch.randint(0, 300, (2, 16))
    targets = torch.randint(0, 300, (2, 16))
    (logits_p, _), (_, loss_p) = padded(idx), padded(idx, targets)
    (logits_u, _), (_, loss_u) = plain(idx), plain(idx, targets)
    assert logits_p.shape == (2, 16, 300)
    assert torch.allclose(logits_p, logits_u, atol=1e-6) and torch.allclose(loss_p, loss_u, atol=1e-6)
    loss_p.backward()
    assert torch.all(padded.transformer.wte.weight.grad[300:] == 0)
    generated = padded.generate(idx[:, :4], 20, top_k=None, generator=torch.Generator().manual_seed(0))
    assert generated.max() < 300


def test_bias_false_has_no_biases():
    model = GPT(GPTConfig(**SMALL, bias=False))
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert model(torch.randint(0, 300, (1, 8)))[0].shape == (1, 8, 300)


def test_loss_ignores_minus_one_and_matches_cross_entropy():
    model = GPT(GPTConfig(**SMALL))
    idx = torch.randint(0, 300, (2, 8))
    targets = torch.randint(0, 300, (2, 8))
    targets[:, :3] = -1
    logits, loss = model(idx)[0], model(idx, targets)[1]
    keep = targets != -1
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, expected)


def unchunked_loss(features, weight, targets, vocab):
    """The loss as GPT computed it before chunking: every row's logits at once, upcast, one cross-entropy."""
    logits = torch.nn.functional.linear(features, weight)[:, :vocab]
    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-1)


def loss_and_grads(loss_fn, features, weight, targets, vocab, autocast=False):
    features, weight = features.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(features, weight, targets, vocab)
    loss.backward()
    return [loss.double(), features.grad.double(), weight.grad.double()]


def test_chunked_loss_equals_the_unchunked_one_in_fp32_and_bf16(monkeypatch):
    import model.gpt as gpt
    torch.manual_seed(0)
    rows, width, padded, vocab = 1000, 64, 320, 300
    monkeypatch.setattr(gpt, "LOSS_CHUNK_LOGITS", 96 * padded)  # 11 chunks, the last one short
    features, weight = torch.randn(rows, width, dtype=torch.float64), 0.5 * torch.randn(padded, width, dtype=torch.float64)
    targets = torch.randint(0, vocab, (rows,))
    targets[:70] = -1
    # fp32: equal within fp32 rounding (only the order of the sums differs).
    new = loss_and_grads(gpt.chunked_cross_entropy, features.float(), weight.float(), targets, vocab)
    old = loss_and_grads(unchunked_loss, features.float(), weight.float(), targets, vocab)
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert new[2][vocab:].abs().max() == 0  # the padding rows get no gradient, as before
    # bf16 (autocast over fp32 weights, and bf16 weights as DeepSpeed's bf16 engine holds them): both are bf16
    # matmuls, so compare each against fp64 on the same bf16-rounded inputs: the chunked loss is as close as before.
    exact = loss_and_grads(unchunked_loss, features.bfloat16().double(), weight.bfloat16().double(), targets, vocab)
    for f, w, autocast in ((features.float(), weight.float(), True), (features.bfloat16(), weight.bfloat16(), False)):
        new = loss_and_grads(gpt.chunked_cross_entropy, f, w, targets, vocab, autocast)
        old = loss_and_grads(unchunked_loss, f, w, targets, vocab, autocast)
        for a, b, e in zip(new, old, exact):
            error_new, error_old = ((a - e).norm() / e.norm()).item(), ((b - e).norm() / e.norm()).item()
            assert error_new <= 1.1 * error_old + 1e-6, (autocast, error_new, error_old)
            assert ((a - b).norm() / e.norm()).item() < 2 ** -7  # and within bf16 rounding of the old one


def test_the_loss_keeps_no_logits_and_traces_as_one_graph(monkeypatch):
    import model.gpt as gpt
    torch.manual_seed(0)
    monkeypatch.setattr(gpt, "LOSS_CHUNK_LOGITS", 32 * 320)  # 4 chunks of 32 rows
    model = GPT(GPTConfig(**SMALL, padded_vocab_size=320))
    idx, targets = torch.randint(0, 300, (4, 32)), torch.randint(0, 300, (4, 32))
    largest = []

    def keep(tensor):
        largest.append(tensor.numel())
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(idx, targets)[1].backward()
    assert max(largest) < 128 * 300  # no (rows x vocab) logits kept for backward, as before (its log-softmax)
    eager = [p.grad.clone() for p in model.parameters()]
    # fullgraph=True raises on any graph break; aot_eager runs the traced forward and backward graphs.
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(idx, targets)[1].backward()
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx, targets)[1], model(idx, targets)[1])
    for a, p in zip(eager, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-7)


def test_sequence_longer_than_block_size():
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_generate_greedy_is_argmax_and_slides_past_block_size():
    model = GPT(GPTConfig(**SMALL)).eval()
    idx = torch.randint(0, 300, (2, 30))
    out = model.generate(idx, 10, top_k=1)  # ends at 40 tokens: the context slides past block_size 32
    assert out.shape == (2, 40) and torch.equal(out[:, :30], idx)
    for t in range(30, 40):
        context = out[:, max(0, t - 32):t]
        assert torch.equal(model(context)[0][:, -1].argmax(-1), out[:, t])


def test_generate_is_reproducible_with_a_generator():
    model = GPT(GPTConfig(**SMALL)).eval()
    idx = torch.randint(0, 300, (3, 4))
    a = model.generate(idx, 12, top_k=50, generator=torch.Generator().manual_seed(7))
    b = model.generate(idx, 12, top_k=50, generator=torch.Generator().manual_seed(7))
    c = model.generate(idx, 12, top_k=50, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("values,message", [
    ({"n_layers": 2}, "unknown model config key"),
    ({"preset": "gpt5"}, "unknown model preset"),
    ({"n_embd": 100, "n_head": 3}, "not divisible by n_head"),
    ({"n_layer": 0}, "n_layer must be a positive integer"),
    ({"dropout": 1.0}, "dropout"),
    ({"bias": "yes"}, "bias"),
    ({"padded_vocab_size": 100}, "padded_vocab_size"),
])
def test_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig.from_dict(values)


def test_resolve_presets_and_yaml(tmp_path):
    assert GPTConfig.resolve("gpt2-medium") == GPTConfig.preset("gpt2-medium")
    (tmp_path / "m.yaml").write_text("preset: gpt2\nn_layer: 6\n")
    assert GPTConfig.resolve(str(tmp_path / "m.yaml")) == GPTConfig.preset("gpt2", n_layer=6)
    (tmp_path / "recipe.yaml").write_text("run_dir: runs/x\nmodel: {n_layer: 2, n_head: 2, n_embd: 64}\n")
    assert GPTConfig.resolve(str(tmp_path / "recipe.yaml")) == GPTConfig(n_layer=2, n_head=2, n_embd=64)
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="no model mapping"):
        GPTConfig.resolve(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="neither a preset"):
        GPTConfig.resolve("gpt-9")
    assert GPTConfig.from_dict(GPTConfig.preset("tiny").to_dict()) == GPTConfig.preset("tiny")
