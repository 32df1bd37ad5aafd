"""The GPT-2 network: learned positions, pre-norm blocks, causal attention, tied LM head."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from .config import GPTConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Plain causal attention dispatches to flash kernels on GPU; an explicit mask (True = may attend) is for
        # packed sequences, e.g. several continuations of one shared context.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class _SkipInit(TorchFunctionMode):
    """Inside, torch.nn.init's in-place fills (normal_, kaiming_uniform_, zeros_, ...) leave their tensor as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


# Rows of the LM head's output the loss holds at once: about 2^27 logits (512 MiB in fp32) per chunk, whatever the
# micro batch (GPT-2 124M at 64 x 1,024 tokens: 25 chunks of 2,668 rows instead of 12.4 GiB of fp32 logits).
LOSS_CHUNK_LOGITS = 2 ** 27


def _loss_chunks(features: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, vocab: int):
    """(rows, the matmul's dtype, their logits in fp32 with padding columns at -inf, their targets) per chunk of
    rows. The head's matmul runs over every (padded) row of the weight, so its shape stays a multiple of 64, and
    in the dtype autocast or the inputs give it (bf16 on GPUs); the padding then never predicts."""
    rows = max(1, LOSS_CHUNK_LOGITS // weight.size(0))
    for start in range(0, features.size(0), rows):
        h = features[start:start + rows]
        raw = F.linear(h, weight)
        logits = raw.float()
        if vocab < weight.size(0):
            logits[:, vocab:] = float("-inf")
        yield start, h, raw.dtype, logits, targets[start:start + rows]


def _chunk_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p(target) over the rows whose target is not -1, the fp32 log-softmax's normaliser)."""
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(targets != -1, lse - picked, 0.0).sum(), lse


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (features @ weight.T)[:, :vocab] against targets (-1: ignored), chunk by chunk.

    Each chunk's logits exist only while it is processed. Because the loss is a scalar, the forward also takes
    each chunk's gradients, through the same matmuls an unchunked backward runs: (softmax - one-hot) / count in
    fp32, cast to the matmul's dtype, times the weight (the features' gradient) and times the features (the
    weight's, summed over chunks in fp32). Backward only scales the two kept gradients: no matmul is repeated and
    no (rows, vocab) tensor outlives its chunk. The log-softmax and its gradient are fp32, as the unchunked
    F.cross_entropy(logits.float()) had them.
    """

    @staticmethod
    def forward(ctx, features, weight, targets, vocab):
        count = (targets != -1).sum().clamp(min=1).float()
        total = features.new_zeros((), dtype=torch.float32)
        grad_features = None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start, h, dtype, logits, t in _loss_chunks(features, targets, weight, vocab):
            loss, lse = _chunk_loss_sum(logits, t)
            total = total + loss
            # In place: one fp32 (rows, vocab) buffer per chunk, as the logits are not needed again.
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
            grad = grad.mul_(((t != -1).float() / count).unsqueeze(1)).to(dtype)
            chunk = grad @ weight.to(dtype)
            if grad_features is None:
                grad_features = chunk.new_empty((features.size(0), chunk.size(1)))
            grad_features[start:start + h.size(0)] = chunk
            grad_weight += grad.t() @ h.to(dtype)
        ctx.save_for_backward(grad_features, grad_weight)
        ctx.dtypes = (features.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_features, grad_weight = ctx.saved_tensors
        features_dtype, weight_dtype = ctx.dtypes
        return ((grad_features * grad_output).to(features_dtype), (grad_weight * grad_output).to(weight_dtype),
                None, None)


def chunked_cross_entropy(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          vocab: int) -> torch.Tensor:
    """Mean cross-entropy of the LM head over (N, C) features against (N,) targets (-1 ignored), never holding
    the logits of more than one chunk of rows (LOSS_CHUNK_LOGITS)."""
    if torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(features, weight, targets, vocab)
    total = features.new_zeros((), dtype=torch.float32)
    for _, _, _, logits, t in _loss_chunks(features, targets, weight, vocab):
        total = total + _chunk_loss_sum(logits, t)[0]
    return total / (targets != -1).sum().clamp(min=1).float()


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # Parameter names follow Hugging Face's GPT2LMHeadModel so conversion is a rename-free copy.
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_rows, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.embedding_rows, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        # A training-time choice, not part of the shape: recompute each block in backward instead of keeping its
        # activations (train sets it from the recipe; checkpoints and exports do not record it).
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2 scales residual projections so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def empty(cls, config: GPTConfig) -> "GPT":
        """The network on the meta device, shapes only: for loaders, which then call load_weights. A random init
        they would overwrite costs about 2 s for 124M on CPU and grows with size, paid again by every eval job;
        even on meta, normal_ runs through torch's Python reference kernels, whose first use imports TorchDynamo
        (0.8 s), so the init's fills are skipped altogether."""
        with torch.device("meta"), _SkipInit():
            return cls(config)

    def load_weights(self, state: dict) -> "GPT":
        """Take `state`'s tensors as the parameters (no copy), the tied head included."""
        self.load_state_dict(state, assign=True)
        self.lm_head.weight = self.transformer.wte.weight  # assign gives each name its own Parameter: re-tie
        return self

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), None); with targets (B, T) (-1: ignored) ->
        (None, mean cross-entropy): training never materialises the whole batch's logits (chunked_cross_entropy)."""
        features = self.features(idx)
        if targets is None:
            return self.head(features), None
        return None, chunked_cross_entropy(features.reshape(-1, features.size(-1)), self.lm_head.weight,
                                           targets.reshape(-1), self.config.vocab_size)

    def features(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> final-layernormed hidden states (B, T, n_embd).

        By default position t is t and attention is causal. A packed batch gives both: positions (B, T) and a
        boolean attn_mask (B, 1, T, T), True where a query may attend to a key.
        """
        B, T = idx.shape
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            positions = torch.arange(T, device=idx.device)
        elif int(positions.max()) >= self.config.block_size:
            raise ValueError(f"position {int(positions.max())} exceeds block_size {self.config.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return self.transformer.ln_f(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Hidden states -> logits over the real vocabulary: padding rows never become predictions."""
        return self.lm_head(features)[..., : self.config.vocab_size]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); top_k=1 is greedy decoding."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits = self.head(self.features(context)[:, -1, :]).float()  # only the last position samples
            if top_k is not None and top_k <= 1:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / max(temperature, 1e-8)
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

    def num_params(self, include_padding: bool = False) -> int:
        """Unique parameters (the tied head counted once); padding rows left out unless asked."""
        n = sum(p.numel() for p in self.parameters())
        if not include_padding:
            n -= (self.config.embedding_rows - self.config.vocab_size) * self.config.n_embd
        return n

    @classmethod
    def from_hf(cls, source, **overrides) -> "GPT":
        """Load a transformers GPT2LMHeadModel directory (safetensors or .bin) or its state dict."""
        from .hf import load_hf
        return load_hf(cls, source, **overrides)

    def save_hf(self, path) -> None:
        """Write a directory that transformers' GPT2LMHeadModel and AutoTokenizer load offline."""
        from .hf import save_hf
        save_hf(self, path)
