"""eval --dtype: bf16 scoring (the GPU's default) gives the fp32 `hf` backend's HellaSwag decisions.

CPU autocast in bf16 stands in for the GPU's: the transformer's matmuls run in bf16 either way.
"""
import json
import subprocess

import numpy as np
import pytest
import torch

from tests.conftest import PYTHON, REPO
from tests.test_eval import eval_run, exported, hellaswag_file, latest_tag_dir  # noqa: F401  (fixtures)

LIMIT = 300  # docs compared (the issue asks for >= 300)


def per_doc(samples: list[dict]) -> dict[int, np.ndarray]:
    """{doc_id: the log-likelihood of each ending}."""
    return {s["doc_id"]: np.array([r[0][0] for r in s["resps"]]) for s in samples}


def decisions(lls: dict[int, np.ndarray], docs: dict[int, dict]) -> dict[int, int]:
    """acc_norm's choice per doc, as lm-eval makes it: the largest log-likelihood per character of the ending."""
    return {d: int(np.argmax(ll / np.array([len(c) for c in docs[d]["choices"]]))) for d, ll in lls.items()}


@pytest.fixture(scope="module")
def tasks(hellaswag_file):  # noqa: F811
    from eval import harness
    return harness.load_tasks(["hellaswag"], hellaswag_file)


@pytest.fixture(scope="module")
def reference(exported, tasks):  # noqa: F811
    """lm-eval's `hf` backend in fp32 on the exported checkpoint: (samples by doc, results)."""
    from lm_eval import simple_evaluate
    out = simple_evaluate(model="hf", model_args={"pretrained": str(exported), "dtype": "float32"}, device="cpu",
                          batch_size=16, limit=LIMIT, log_samples=True, tasks=list(tasks.values()))
    return out["samples"]["hellaswag_local"], out["results"]["hellaswag_local"]


def score(lm, tasks):
    from eval import harness
    out = harness.run_tasks(lm, tasks, limit=LIMIT, log_samples=True)
    return out["samples"]["hellaswag_local"], out["results"]["hellaswag_local"]


def bf16_logits_lm(model):
    """The scorer as it was before the head ran in fp32: the LM head under bf16 autocast too."""
    from eval.lm import PipelineLM

    class Bf16Head(PipelineLM):
        def _logits(self, hidden):
            with self._autocast():
                return self.model.head(hidden).float()
    return Bf16Head(model=model, batch_size=16, device="cpu", dtype="bf16")


def test_bf16_scoring_keeps_the_fp32_decisions(latest_tag_dir, tasks, reference):  # noqa: F811
    from eval.lm import PipelineLM
    from eval.score import load_checkpoint
    model, _ = load_checkpoint(latest_tag_dir)
    ref_samples, ref_results = reference
    docs = {s["doc_id"]: s["doc"] for s in ref_samples}
    ref = per_doc(ref_samples)
    assert sorted(ref) == list(range(LIMIT))
    lm = PipelineLM(model=model, batch_size=16, device="cpu", dtype="bf16")
    assert lm.autocast_dtype == torch.bfloat16
    samples, results = score(lm, tasks)
    ours = per_doc(samples)
    assert decisions(ours, docs) == decisions(ref, docs)
    assert results["acc_norm,none"] == ref_results["acc_norm,none"]
    assert results["acc,none"] == ref_results["acc,none"]
    worst = max(float(np.abs(ours[d] - ref[d]).max()) for d in ref)
    assert worst < 0.01  # the features' bf16 rounding alone: 0.0055 here, 0.024 with bf16 logits as well

    # The LM head in bf16 as well: its logits' rounding adds to the features' and the endings' sums drift further.
    bf16_samples, _ = score(bf16_logits_lm(model), tasks)
    bf16 = per_doc(bf16_samples)
    worst_bf16 = max(float(np.abs(bf16[d] - ref[d]).max()) for d in ref)
    flips = sum(a != b for a, b in zip(decisions(bf16, docs).values(), decisions(ref, docs).values()))
    print(f"largest |log-likelihood - fp32 hf| over {LIMIT} docs: fp32 head {worst:.4f}, bf16 head "
          f"{worst_bf16:.4f} ({flips} acc_norm decisions flipped)")
    assert worst < worst_bf16


def test_auto_is_fp32_on_cpu_and_bad_dtype_is_refused(latest_tag_dir):  # noqa: F811
    from eval.lm import PipelineLM
    from eval.score import load_checkpoint
    model, _ = load_checkpoint(latest_tag_dir)
    lm = PipelineLM(model=model, device="cpu")
    assert (lm.dtype, lm.autocast_dtype) == ("fp32", None)
    with pytest.raises(ValueError, match="dtype must be one of auto, bf16, fp32"):
        PipelineLM(model=model, device="cpu", dtype="fp16")


def test_checkpoint_cli_dtype_flag(eval_run, latest_tag_dir, hellaswag_file, tmp_path):  # noqa: F811
    out = tmp_path / "bf16.json"
    proc = subprocess.run([PYTHON, "-m", "eval", "checkpoint", str(latest_tag_dir), "--hellaswag-file",
                           str(hellaswag_file), "--limit", "4", "--batch-size", "8", "--device", "cpu",
                           "--dtype", "bf16", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["dtype"] == "bf16"
    proc = subprocess.run([PYTHON, "-m", "eval", "checkpoint", str(latest_tag_dir), "--dtype", "fp16"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--dtype" in proc.stderr and "fp16" in proc.stderr


def test_watch_passes_dtype_on():
    import argparse

    from eval.__main__ import scoring_flags
    args = argparse.Namespace(tasks="hellaswag", batch_size=8, hellaswag_file=None, limit=None, device=None,
                              dtype="bf16")
    flags = scoring_flags(args)
    assert flags[flags.index("--dtype") + 1] == "bf16"
