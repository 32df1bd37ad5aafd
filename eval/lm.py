"""Our GPT as an lm-eval-harness model: `lm_eval.api.registry.get_model("gpt2-pipeline")`.

Scoring follows lm-eval's `hf` backend request by request (same context/continuation split, same left
truncation, same EOT prefix for an empty context), so the numbers are comparable with published ones; it is
faster because it batches long-first with little padding and runs the 50k-wide LM head only on the
continuation positions, which is where a small model spends most of its time.
"""
from __future__ import annotations

import lm_eval.models  # noqa: F401  (fills the registry first: lm-eval only does so when it is empty,
import torch           # so registering ours before it would hide `hf` and every other built-in model)
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from model import GPT
from model import tokenizer as bpe

MODEL_NAME = "gpt2-pipeline"


@register_model(MODEL_NAME)
class PipelineLM(TemplateLM):
    """Wraps a model.GPT; through lm-eval's registry (once eval.lm is imported):
    `get_model("gpt2-pipeline").create_from_arg_obj({"checkpoint": PATH}, {"batch_size": 32})`."""

    def __init__(self, model: GPT | None = None, checkpoint: str | None = None, batch_size: int = 32,
                 device: str | None = None, **_ignored):
        super().__init__()
        if (model is None) == (checkpoint is None):
            raise ValueError("give exactly one of model= or checkpoint=")
        if model is None:
            from model.checkpoint import load_model
            model, _ = load_model(checkpoint)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # bf16 where the hardware is built for it; on CPU, fp32 matches the `hf` backend's float32 exactly.
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None

    # ---- what TemplateLM needs to split requests exactly as lm-eval's hf backend does
    @property
    def eot_token_id(self) -> int:
        return bpe.EOT_TOKEN

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return bpe.encode(string)

    def tok_decode(self, tokens) -> str:
        return bpe.decode(tokens)

    # ---- model calls
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context tokens, continuation tokens) pairs -> (sum of continuation log-probs, all greedy)."""
        inputs, spans = [], []
        for context, continuation in batch:
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens does not fit a "
                                 f"{self.max_length}-token context")
            # As the hf backend: keep the last max_length+1 tokens, the final one is only ever a target.
            inp = (context + continuation)[-(self.max_length + 1):][:-1]
            inputs.append(inp)
            spans.append((len(inp) - len(continuation), len(inp)))
        width = max(len(inp) for inp in inputs)
        # Right padding: causal attention keeps it from touching any real position.
        idx = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
        for row, inp in enumerate(inputs):
            idx[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        rows = torch.cat([torch.full((b - a,), r, dtype=torch.long) for r, (a, b) in enumerate(spans)])
        cols = torch.cat([torch.arange(a, b) for a, b in spans])
        targets = torch.tensor([tok for _, cont in batch for tok in cont], dtype=torch.long)
        idx, rows, cols, targets = (t.to(self.device) for t in (idx, rows, cols, targets))
        with self._autocast():
            # The LM head runs only on continuation positions: the 50257-wide matmul is most of a small model's cost.
            logits = self.model.head(self.model.features(idx)[rows, cols])
        logits = logits.float()
        token_logprobs = F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        greedy = logits.argmax(dim=-1) == targets
        out, start = [], 0
        for a, b in spans:
            n = b - a
            out.append((token_logprobs[start:start + n].sum().item(), bool(greedy[start:start + n].all())))
            start += n
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        # Longest first: each batch is padded to its first row, and an out-of-memory shows up at once.
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        with tqdm(total=len(pairs), desc="loglikelihood", disable=disable_tqdm) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for i, result in zip(chunk, self._score_batch([pairs[i] for i in chunk])):
                    results[i] = result
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
                bar.update(len(chunk))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint max_length windows, as the hf backend computes it."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding, one request at a time, cut at the first stop string."""
        outputs = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            tokens = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            idx = torch.tensor([tokens], dtype=torch.long, device=self.device)
            with self._autocast():
                generated = self.model.generate(idx, max_new, top_k=1)[0, len(tokens):].tolist()
            if self.eot_token_id in generated:
                generated = generated[: generated.index(self.eot_token_id)]
            text = self.tok_decode(generated)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs
