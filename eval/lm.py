"""Our GPT as an lm-eval-harness model: `lm_eval.api.registry.get_model("gpt2-pipeline")`.

Scoring follows lm-eval's `hf` backend request by request (same context/continuation split, same left
truncation, same EOT prefix for an empty context), so the numbers are comparable with published ones. It is
faster for three reasons:
- requests that share a context (a multiple-choice doc's endings) are packed into one row: the context once,
  then each continuation, with positions restarting after the context and an attention mask that lets each
  continuation see only the context and itself, so the context is computed once instead of once per ending;
- rows are batched longest first, so there is little padding;
- the 50k-wide LM head runs only on the scored positions, which is where a small model spends most of its time.
`batch_size` counts rows (sequences per forward pass), each at most max_length tokens, like the hf backend's.

`dtype` bf16 runs the transformer under bf16 autocast (the default on CUDA); the LM head and log-softmax always run
in fp32, so the log-likelihoods stay those of the fp32 `hf` backend to within the features' rounding: bf16 logits
keep about 3 significant digits, and summed over a 20-40-token ending that flips close HellaSwag decisions.
"""
from __future__ import annotations

from dataclasses import dataclass

import lm_eval.models  # noqa: F401  (fills the registry first: lm-eval only does so when it is empty,
import torch  # so registering ours before it would hide `hf` and every other built-in model)
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from common import tokenizer as bpe
from model.gpt import GPT

MODEL_NAME = "gpt2-pipeline"
DTYPES = ("auto", "bf16", "fp32")  # auto: bf16 on CUDA, fp32 elsewhere


@dataclass
class Row:
    """One sequence of a batch: a prefix, then continuations that each attend to the prefix and to themselves."""
    prefix: list[int]
    continuations: list[tuple[int, list[int]]]  # (request index, continuation tokens)

    @property
    def length(self) -> int:
        # A continuation's last token is only ever a target, and its first is predicted from the prefix.
        return len(self.prefix) + sum(len(c) - 1 for _, c in self.continuations)

    def add(self, request: int, continuation: list[int]) -> None:
        self.continuations.append((request, continuation))


@register_model(MODEL_NAME)
class PipelineLM(TemplateLM):
    """Wraps a model.GPT; through lm-eval's registry (once eval.lm is imported):
    `get_model("gpt2-pipeline").create_from_arg_obj({"checkpoint": PATH}, {"batch_size": 32})`."""

    def __init__(self, model: GPT | None = None, checkpoint: str | None = None, batch_size: int = 32,
                 device: str | None = None, dtype: str = "auto", **_ignored):
        super().__init__()
        if (model is None) == (checkpoint is None):
            raise ValueError("give exactly one of model= or checkpoint=")
        if model is None:
            from train.rundir.consolidate import load_model
            model, _ = load_model(checkpoint)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        # bf16 where the hardware is built for it; on CPU, fp32 matches the `hf` backend's float32 exactly.
        self.dtype = dtype if dtype != "auto" else "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if self.dtype == "bf16" else None
        # LM-head positions per slice: on CPU small enough that a slice's logits (128 x 50257 fp32, 26 MB) stay in
        # cache for log_softmax and argmax (about 20% faster than one big slice there); on GPU, few large launches.
        self.head_chunk = 8192 if self.device.type == "cuda" else 128

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

    def _rows(self, pairs: list[tuple[list[int], list[int]]]) -> list[Row]:
        """Pack requests that share a context into rows: the context once, then every continuation after it."""
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (context, continuation) in enumerate(pairs):
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens does not fit a "
                                 f"{self.max_length}-token context")
            by_context.setdefault(tuple(context), []).append(i)
        rows: list[Row] = []
        for context, members in by_context.items():
            open_row: Row | None = None
            for i in members:
                continuation = pairs[i][1]
                if len(context) + len(continuation) > self.max_length + 1:
                    # As the hf backend: keep the last max_length+1 tokens (the final one is only a target).
                    kept = (list(context) + continuation)[-(self.max_length + 1):]
                    rows.append(Row(kept[: len(kept) - len(continuation)], [(i, continuation)]))
                    continue
                if open_row is None or open_row.length + len(continuation) - 1 > self.max_length:
                    open_row = Row(list(context), [])
                    rows.append(open_row)
                open_row.add(i, continuation)
        return rows

    @torch.no_grad()
    def _score_rows(self, rows: list[Row]) -> dict[int, tuple[float, bool]]:
        """Packed rows -> {request index: (sum of continuation log-probs, all greedy)}."""
        width = max(row.length for row in rows)
        # Right padding in segment -1: it attends only to the prefix and itself and no real token attends to it.
        idx = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        # Positions whose logits are needed (the prefix's last one once per row: it predicts every continuation's
        # first token), and for each target token the index of the position that predicts it.
        scored_rows, scored_cols, source, targets, owners = [], [], [], [], []
        for r, row in enumerate(rows):
            tokens, pos, seg = list(row.prefix), list(range(len(row.prefix))), [0] * len(row.prefix)
            prefix_last = len(scored_cols)
            scored_rows.append(r)
            scored_cols.append(len(row.prefix) - 1)
            for s, (i, continuation) in enumerate(row.continuations, start=1):
                start, own = len(tokens), len(scored_cols)
                tokens += continuation[:-1]
                pos += range(len(row.prefix), len(row.prefix) + len(continuation) - 1)
                seg += [s] * (len(continuation) - 1)
                scored_rows += [r] * (len(continuation) - 1)
                scored_cols += range(start, start + len(continuation) - 1)
                source += [prefix_last, *range(own, own + len(continuation) - 1)]
                targets += continuation
                owners.append((i, len(continuation)))
            idx[r, : len(tokens)] = torch.tensor(tokens)
            positions[r, : len(pos)] = torch.tensor(pos)
            segments[r, : len(seg)] = torch.tensor(seg)
        mask = None
        if any(len(row.continuations) > 1 for row in rows):
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            same = segments[:, None, :] == segments[:, :, None]
            mask = (causal & ((segments[:, None, :] == 0) | same))[:, None]
        idx, positions = idx.to(self.device), positions.to(self.device)
        mask = mask.to(self.device) if mask is not None else None
        scored_rows, scored_cols, source, targets = (torch.tensor(t, dtype=torch.long, device=self.device)
                                                     for t in (scored_rows, scored_cols, source, targets))
        with self._autocast():
            features = self.model.features(idx, positions if mask is not None else None, mask)
        token_logprobs, greedy = self._target_logprobs(features[scored_rows, scored_cols], source, targets)
        token_logprobs, greedy = token_logprobs.cpu(), greedy.cpu()  # one device sync, not two per request
        out, start = {}, 0
        for i, n in owners:
            out[i] = (token_logprobs[start:start + n].sum().item(), bool(greedy[start:start + n].all()))
            start += n
        return out

    def _target_logprobs(self, hidden: torch.Tensor, source: torch.Tensor, targets: torch.Tensor):
        """log p(targets[k]) and whether it is the argmax, where hidden[source[k]] predicts targets[k].

        The 50257-wide LM head is most of a small model's cost: it runs only on the positions given, a slice of
        head_chunk positions at a time, so log_softmax and the greedy check read each slice's logits while still
        in cache.
        """
        logprobs = torch.empty(len(targets), device=hidden.device)
        greedy = torch.empty(len(targets), dtype=torch.bool, device=hidden.device)
        order = torch.argsort(source, stable=True)
        starts = torch.arange(0, len(hidden) + self.head_chunk, self.head_chunk, device=hidden.device)
        bounds = torch.searchsorted(source[order], starts).tolist()
        for k, start in enumerate(range(0, len(hidden), self.head_chunk)):
            logits = self._logits(hidden[start:start + self.head_chunk])
            which = order[bounds[k]:bounds[k + 1]]  # the targets this slice predicts
            local, wanted = source[which] - start, targets[which]
            logprobs[which] = F.log_softmax(logits, dim=-1)[local, wanted]
            # Greedy means argmax == target. amax is several times faster than argmax on CPU; argmax's tie rule (the
            # first maximum wins) is then applied to the few targets that reach the maximum.
            hit = logits[local, wanted] == logits.amax(dim=-1)[local]
            at_max = hit.nonzero().squeeze(1)
            hit[at_max] = logits[local[at_max]].argmax(dim=-1) == wanted[at_max]
            greedy[which] = hit
        return logprobs, greedy

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head in fp32 whatever dtype the features were computed in (see the module's docstring)."""
        with torch.autocast(self.device.type, enabled=False):
            return self.model.head(hidden.to(self.model.lm_head.weight.dtype)).float()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        # Longest first: each batch is padded to its first row, and an out-of-memory shows up at once.
        rows = sorted(self._rows(pairs), key=lambda row: -row.length)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        with tqdm(total=len(pairs), desc="loglikelihood", disable=disable_tqdm) as bar:
            for start in range(0, len(rows), self.batch_size):
                scored = self._score_rows(rows[start:start + self.batch_size])
                for i, result in scored.items():
                    results[i] = result
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
                bar.update(len(scored))
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
