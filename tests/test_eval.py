"""eval/: offline HellaSwag through lm-eval, agreement with lm-eval's own `hf` backend, export, bad input."""
import json
import re
import shutil
import subprocess

import pytest
import torch

from tests.conftest import PYTHON, REPO

LIMIT = 200  # docs in the agreement test (the issue asks for >= 200)


@pytest.fixture(scope="module")
def hellaswag_file(shared_dir):
    return shared_dir / "data" / "hellaswag_val.jsonl"


@pytest.fixture(scope="module")
def eval_run(tiny_run, tmp_path_factory):
    """A private copy of the trained run: these tests write RUN/eval/ and damage checkpoints."""
    run = tmp_path_factory.mktemp("eval_run") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval", "tb"))
    return run


@pytest.fixture(scope="module")
def latest_tag_dir(eval_run):
    return eval_run / "checkpoints" / (eval_run / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def exported(eval_run, latest_tag_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    proc = subprocess.run([PYTHON, "-m", "eval", "export", str(latest_tag_dir), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def run_cli(*argv, capsys):
    from eval.__main__ import main
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr()


def test_local_task_is_lm_evals_hellaswag(hellaswag_file):
    """Everything that decides a HellaSwag score is taken from the installed lm-eval's own task."""
    import lm_eval.tasks.hellaswag.utils as upstream_utils
    from lm_eval.tasks._yaml_loader import load_yaml

    from eval import harness
    ours = harness.hellaswag_config(hellaswag_file)
    upstream = load_yaml(upstream_utils.__file__.replace("utils.py", "hellaswag.yaml"))
    for key in ("output_type", "validation_split", "doc_to_text", "doc_to_target", "doc_to_choice",
                "metric_list", "metadata"):
        assert ours[key] == upstream[key], key
    assert ours["process_docs"] is upstream_utils.process_docs
    assert ours["dataset_path"] == "json"
    task = harness.load_tasks(["hellaswag"], hellaswag_file)["hellaswag"]
    docs = list(task.validation_docs())
    assert len(docs) == 10042
    assert docs[0]["query"] == "Roof shingle removal: A man is sitting on a roof. he"
    assert task.doc_to_target(docs[0]) == docs[0]["gold"] == 3


def test_export_loads_in_transformers_offline(exported, latest_tag_dir):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from train.rundir.consolidate import load_model
    hf = GPT2LMHeadModel.from_pretrained(exported, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    ours, _ = load_model(latest_tag_dir)
    ids = tok("ROMEO: But soft, what light through yonder window breaks?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], atol=1e-4, rtol=1e-4)


def test_agreement_with_lm_eval_hf_backend(exported, latest_tag_dir, hellaswag_file):
    """Same docs, same requests: lm-eval's `hf` backend on the export and our evaluator on the checkpoint."""
    from lm_eval import simple_evaluate

    from eval import harness
    from eval.lm import PipelineLM
    from train.rundir.consolidate import load_model
    model, _ = load_model(latest_tag_dir)
    ours = harness.run_tasks(PipelineLM(model=model, batch_size=16, device="cpu"),
                             harness.load_tasks(["hellaswag"], hellaswag_file), limit=LIMIT, log_samples=True)
    reference = simple_evaluate(model="hf", model_args={"pretrained": str(exported), "dtype": "float32"},
                                device="cpu", batch_size=16, limit=LIMIT, log_samples=True,
                                tasks=list(harness.load_tasks(["hellaswag"], hellaswag_file).values()))
    name = "hellaswag_local"
    for metric in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none"):
        assert ours["results"][name][metric] == reference["results"][name][metric], metric
    samples = {s["doc_id"]: s for s in ours["samples"][name]}
    ref_samples = {s["doc_id"]: s for s in reference["samples"][name]}
    assert sorted(samples) == sorted(ref_samples) == list(range(LIMIT))
    worst = 0.0
    for doc_id, ref in ref_samples.items():
        assert samples[doc_id]["arguments"] == ref["arguments"]  # identical requests
        for (ll, greedy), (ref_ll, ref_greedy) in zip((r[0] for r in samples[doc_id]["resps"]),
                                                      (r[0] for r in ref["resps"]), strict=True):
            worst = max(worst, abs(ll - ref_ll))
            assert greedy == ref_greedy
    assert worst < 1e-4, f"largest per-request log-likelihood difference {worst:.2e}"


@pytest.mark.parametrize("batch_size, head_chunk", [(1, 128), (3, 2)])
def test_packed_scoring_matches_one_request_per_sequence(batch_size, head_chunk):
    """Shared contexts packed into rows, rows split when too long, left truncation, the LM head in slices: each
    request's score is what a plain forward pass over that request alone gives."""
    from eval.lm import PipelineLM
    from model.config import GPTConfig
    from model.gpt import GPT
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=50257)).eval()
    tokens = lambda n: torch.randint(0, 50257, (n,)).tolist()  # noqa: E731
    short, long_ = tokens(5), tokens(20)
    pairs = ([(short, tokens(n)) for n in (1, 4, 7, 3)]     # one row: 5 + 0 + 3 + 6 + 2 = 16 tokens
             + [(long_, tokens(n)) for n in (3, 4, 2, 5)]   # over 24 packed: split across rows; 5 -> truncated
             + [(tokens(30), tokens(6)), (tokens(2), tokens(24))])  # truncated context; longest continuation
    requests = [(None, context, continuation) for context, continuation in pairs]
    lm = PipelineLM(model=model, batch_size=batch_size, device="cpu")
    lm.head_chunk = head_chunk
    assert len(lm._rows(pairs)) < len(pairs)
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        inp = (context + continuation)[-25:]
        with torch.no_grad():
            logits = model(torch.tensor([inp[:-1]]))[0][0, -len(continuation):]
        expected = torch.log_softmax(logits, -1)[torch.arange(len(continuation)), torch.tensor(continuation)]
        assert logprob == pytest.approx(expected.sum().item(), abs=1e-5)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(continuation)).all())


def test_greedy_follows_argmax_on_ties():
    """Two tokens with identical head rows tie for the maximum: only the first counts as greedy, as with argmax."""
    from eval.lm import PipelineLM
    from model.config import GPTConfig
    from model.gpt import GPT
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257)).eval()
    with torch.no_grad():
        model.lm_head.weight[7] = model.lm_head.weight[3]
    hidden = 50 * model.lm_head.weight[3].detach()[None].repeat(2, 1)  # tokens 3 and 7 score highest, equally
    lm = PipelineLM(model=model, device="cpu")
    logprobs, greedy = lm._target_logprobs(hidden, torch.tensor([0, 1, 1]), torch.tensor([3, 7, 0]))
    assert greedy.tolist() == [True, False, False]
    assert logprobs[0] == logprobs[1] > logprobs[2]


def test_checkpoint_cli_writes_result(eval_run, latest_tag_dir, hellaswag_file):
    from train.rundir.consolidate import load_model
    proc = subprocess.run([PYTHON, "-m", "eval", "checkpoint", str(latest_tag_dir), "--hellaswag-file",
                           str(hellaswag_file), "--limit", "20", "--batch-size", "8"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = eval_run / "eval" / f"{latest_tag_dir.name}.json"
    record = json.loads(out.read_text())
    _, meta = load_model(latest_tag_dir)
    assert record["tag"] == latest_tag_dir.name
    assert (record["step"], record["tokens_seen"]) == (meta["step"], meta["tokens_seen"]) and meta["step"] > 0
    assert record["lm_eval_version"] == "0.4.13"
    hs = record["tasks"]["hellaswag"]
    assert hs["n_docs"] == 20 and hs["task_version"] == 1.0
    for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert 0.0 <= hs[metric] <= 1.0
    assert record["wall_time_s"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary files left behind


# ---- bad input: one `error:` line, exit status 1, nothing written

def _damaged_copy(tag_dir, tmp_path, damage):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    shutil.copytree(tag_dir, ckpts / tag_dir.name)
    (ckpts / "latest").write_text(tag_dir.name)
    damage(ckpts / tag_dir.name)
    return ckpts / tag_dir.name


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_of_several_checkpoints_one_gone_is_its_own_error_and_the_others_are_scored(exported, hellaswag_file,
                                                                                   tmp_path, capsys):
    # The watcher scores several in one child: a checkpoint rotated away after it was listed made the whole child
    # a usage error (exit 2) before anything was scored, and cost the others a failed attempt.
    hf, gone = tmp_path / "hf", tmp_path / "rotated"
    shutil.copytree(exported, hf)
    rc, cap = run_cli("checkpoint", gone, hf, "--hellaswag-file", hellaswag_file, "--limit", 5, capsys=capsys)
    assert rc == 1
    assert [line for line in cap.err.splitlines() if line.startswith("error:")] == [
        f"error: cannot load checkpoint {gone}: {gone} does not exist"], cap.err
    assert json.loads((tmp_path / "hf.eval.json").read_text())["tasks"]["hellaswag"]["n_docs"] == 5
    rc, cap = run_cli("checkpoint", gone, "--hellaswag-file", hellaswag_file, capsys=capsys)
    assert rc == 2 and cap.err == f"error: argument CKPT: {gone}: no such file or directory\n"


def test_an_hf_directory_is_scored_into_a_file_beside_it_as_the_startup_table_says(exported, hellaswag_file,
                                                                                  tmp_path, capsys):
    hf = tmp_path / "my model"
    shutil.copytree(exported, hf)
    rc, cap = run_cli("checkpoint", hf, "--hellaswag-file", hellaswag_file, "--limit", 5, capsys=capsys)
    assert rc == 0, cap.err
    out = tmp_path / "my model.eval.json"
    assert re.search(rf"^  output +{re.escape(str(out))}$", cap.out, re.M), cap.out  # it had said RUN/eval/<tag>.json
    assert json.loads(out.read_text())["tasks"]["hellaswag"]["n_docs"] == 5


@pytest.mark.parametrize("damage", [
    pytest.param(lambda d: [p.unlink() for p in d.glob("*optim_states.pt")], id="partial"),
    pytest.param(lambda d: _truncate(next(d.glob("mp_rank_00_model_states.pt"))), id="corrupt"),
])
def test_bad_checkpoint_is_a_clear_error(damage, latest_tag_dir, hellaswag_file, tmp_path, capsys):
    tag_dir = _damaged_copy(latest_tag_dir, tmp_path, damage)
    rc, cap = run_cli("checkpoint", tag_dir, "--hellaswag-file", hellaswag_file, "--limit", 5, capsys=capsys)
    assert rc == 1
    assert cap.err.startswith("error: ") and cap.err.count("\n") == 1, cap.err
    assert tag_dir.name in cap.err
    assert not (tmp_path / "run" / "eval").exists()


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled",))


@pytest.mark.parametrize("name, write", [
    pytest.param("model.safetensors", lambda p: p.write_bytes(b"\x10\x00" * 8), id="truncated-safetensors"),
    pytest.param("pytorch_model.bin", lambda p: p.write_bytes(b"garbage"), id="not-a-pickle"),
    pytest.param("pytorch_model.bin", lambda p: torch.save({"w": _RunsCode()}, p), id="needs-a-function"),
])
def test_unreadable_hf_weights_are_a_clear_error(name, write, tmp_path, capsys):
    # model.hf reads an HF directory's weights itself; safetensors' and torch's own errors were a traceback, in eval
    # and in model sample alike
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 64,
                                                "n_positions": 64, "vocab_size": 50257}))
    write(hf / name)
    rc, cap = run_cli("export", hf, "--out", tmp_path / "out", capsys=capsys)
    assert rc == 1 and "unpickled" not in cap.out
    assert cap.err.startswith(f"error: cannot load checkpoint {hf}: {hf / name}: cannot read its weights") and \
        cap.err.count("\n") == 1, cap.err
    assert not (tmp_path / "out").exists()


def test_unknown_shape_is_a_clear_error(exported, hellaswag_file, tmp_path, capsys):
    bad = tmp_path / "hf"
    shutil.copytree(exported, bad)
    config = json.loads((bad / "config.json").read_text())
    config["n_embd"] *= 2  # the weights are for the real width
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "result.json"
    rc, cap = run_cli("checkpoint", bad, "--hellaswag-file", hellaswag_file, "--out", out, capsys=capsys)
    assert rc == 1
    assert cap.err.startswith("error: ") and "shape" in cap.err and cap.err.count("\n") == 1, cap.err
    assert not out.exists()


@pytest.mark.parametrize("content,expected", [
    (None, "no such file or directory"),
    ('{"activity_label": "x", "ctx_a": "a", "ctx_b": "", "endings": ["a", "b", "c", "d"], "label": 0}\n{oops\n',
     ":2: not valid JSON"),
    ('{"activity_label": "x", "ctx_a": "a", "endings": ["a", "b"], "label": 0}\n', "missing ctx_b"),
    ('{"activity_label": "x", "ctx_a": "a", "ctx_b": "", "endings": ["a", "b", "c", "d"], "label": 7}\n',
     "out of range"),
], ids=["missing", "not-json", "missing-key", "bad-label"])
def test_bad_hellaswag_file_is_a_clear_error(content, expected, exported, tmp_path, capsys):
    data = tmp_path / "hellaswag.jsonl"
    if content is not None:
        data.write_text(content)
    out = tmp_path / "result.json"
    rc, cap = run_cli("checkpoint", exported, "--hellaswag-file", data, "--out", out, capsys=capsys)
    assert rc == (2 if content is None else 1)  # a missing file named on the command line is a usage error
    assert cap.err.startswith("error: ") and expected in cap.err and cap.err.count("\n") == 1, cap.err
    assert not out.exists()


def test_unknown_task_is_a_clear_error(exported, tmp_path, capsys):
    out = tmp_path / "result.json"
    rc, cap = run_cli("checkpoint", exported, "--tasks", "hellaswag_but_not_really", "--out", out, capsys=capsys)
    assert rc == 1
    assert cap.err.startswith("error: ") and "'hellaswag_but_not_really'" in cap.err and cap.err.count("\n") == 1
    assert not out.exists()


def test_rolling_loglikelihood_and_generation_match_hf_backend(exported, latest_tag_dir, shared_dir):
    """The other two request types, against lm-eval's `hf` backend: a text longer than the context, greedy text."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from eval.lm import PipelineLM
    ours = get_model("gpt2-pipeline").create_from_arg_obj({"checkpoint": str(latest_tag_dir)},
                                                          {"batch_size": 4, "device": "cpu"})
    assert isinstance(ours, PipelineLM)
    reference = get_model("hf").create_from_arg_obj({"pretrained": str(exported), "dtype": "float32"},
                                                     {"batch_size": 4, "device": "cpu"})
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text()[:3000]  # ~3 windows of 256 tokens
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0), Instance("loglikelihood_rolling", {}, ("Hi",), 1)]
    for mine, ref in zip(ours.loglikelihood_rolling(rolling), reference.loglikelihood_rolling(rolling), strict=True):
        assert abs(mine - ref) < 1e-3 and mine < 0, (mine, ref)
    prompts = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}), i)
               for i, p in enumerate(["ROMEO:", "First Citizen:\nWe are"])]
    assert ours.generate_until(prompts) == reference.generate_until(prompts)
