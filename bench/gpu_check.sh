#!/usr/bin/env bash
# Every measurement of docs/benchmarks.md that needs a GPU, on one GPU in at most 5 minutes (wheel install
# included), the most important first; each step has its own time limit and an overrun costs only that step:
#   1. preflight: install what the image lacks from .gpu/whl, versions, imports, and one bf16 causal attention
#      forward + backward of the model's own block, which must run torch's flash kernel
#   2. data: Tiny Shakespeare tokenized, its val split larger than one validation batch
#   3. python -m train on GPT-2 124M (its recipe's micro batch 64, one update = 64 x 1024 tokens), eager: as
#      shipped (DeepSpeed's throughput timer off), then with that timer on, DeepSpeed's default, which synchronizes
#      the GPU twice per micro step (MFU, tokens/s, data wait)
#   4. the same compiled, as shipped (MFU; TORCH_LOGS=graph_breaks,recompiles counted)
#   5. full HellaSwag (10,042 docs) for the 124M checkpoint of step 3 (python -m eval checkpoint, bf16 with the
#      LM head in fp32), and bf16 against fp32 scoring on its first 500 docs (bench/bench_eval.py --dtypes)
#   6. model plan's memory estimate against torch.cuda.max_memory_allocated (bench/bench_plan_memory.py)
# and prints the rows for docs/benchmarks.md at the end. By hand only: the tests never run it.
#
#   PYTHON=.venv/bin/python bench/gpu_check.sh prepare   # with network, from the repo root: fills .gpu/
#   bench/gpu_check.sh                                   # on the GPU machine, from the repo root, .gpu/ beside it
#   PYTHON=.venv/bin/python bench/gpu_check.sh dry-run   # on a CPU: the same steps, tiny model, a few updates
#
# A bare GPU image has torch but neither DeepSpeed nor lm-eval, and often no network. `prepare` collects, as
# wheels for the GPU machine's Python (GPU_PYTHON_VERSION, default 3.12), the packages DeepSpeed and lm-eval need
# that the image lacks (IMAGE_HAS, the image's package list) or has at a version they refuse (IMAGE_VERSIONS),
# at the versions installed here (what the tests use). Packages published only as source (DeepSpeed, and lm-eval's
# rouge-score, sqlitedict, word2number) are built into wheels here; each must come out pure Python. On the GPU
# machine pip resolves deepspeed and lm-eval against the image's own packages and installs only what is missing,
# into a directory of its own: nothing of the image is replaced or shadowed. Carry the whole .gpu/ folder (at most
# 48 MiB; .gitignore keeps it out of git): it also holds tiktoken's GPT-2 files, Tiny Shakespeare and HellaSwag.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
GPU_DIR=.gpu
SHARED=${PIPELINE_SHARED:-../shared}
PY=${PYTHON:-python3}
IMAGE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite
lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
# The versions of it known (its pip list): a requirement one of them fails makes prepare carry our copy.
IMAGE_VERSIONS="accelerate==1.15.0 huggingface-hub==1.33.0 numpy==2.5.2 safetensors==0.8.0 tiktoken==0.14.0
tokenizers==0.23.2 torch==2.11.0 transformers==5.17.0 triton==3.6.0"
ROOTS="deepspeed lm-eval"

if [ "$MODE" = prepare ]; then
    rm -rf "$GPU_DIR/whl" "$GPU_DIR/build"
    mkdir -p "$GPU_DIR/whl" "$GPU_DIR/build"
    # name==version of every package to carry, one a line; requirements.txt: the roots' lines of it
    "$PY" - "$IMAGE_HAS" "$IMAGE_VERSIONS" "$ROOTS" "${GPU_PYTHON_VERSION:-3.12}" "$GPU_DIR/requirements.txt" \
        >"$GPU_DIR/carry.txt" <<'EOF'
import importlib.metadata as m, re, sys
from packaging.requirements import Requirement
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image = {norm(n) for n in sys.argv[1].split()}
image_versions = dict((norm(n), v) for n, v in (kv.split("==") for kv in sys.argv[2].split()))
# Markers as the GPU machine's Python evaluates them.
target = {"python_version": sys.argv[4], "python_full_version": sys.argv[4] + ".0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
carry, seen = {}, set()
def image_satisfies(req):
    have = image_versions.get(norm(req.name))
    return norm(req.name) in image and (have is None or req.specifier.contains(have, prereleases=True))
def walk(name, extras=frozenset()):
    if (norm(name), extras) in seen:
        return
    seen.add((norm(name), extras))
    dist = m.distribution(name)
    carry[norm(name)] = f"{dist.metadata['Name']}=={dist.version}"
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker and not any(req.marker.evaluate({**target, "extra": e}) for e in ("", *extras)):
            continue
        if not image_satisfies(req):
            walk(req.name, frozenset(req.extras))
for root in sys.argv[3].split():
    walk(root)
print("\n".join(sorted(carry.values(), key=str.lower)))
open(sys.argv[5], "w").write("".join(carry[norm(root)] + "\n" for root in sys.argv[3].split()))
EOF
    # Wheels for the GPU machine's Python where published; else built here from source, and then pure Python only.
    while read -r spec; do
        if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
                --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 --platform any -d "$GPU_DIR/whl" "$spec" 2>/dev/null; then
            "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$GPU_DIR/build" "$spec"
        fi
    done <"$GPU_DIR/carry.txt"
    for built in "$GPU_DIR"/build/*.whl; do
        [ -e "$built" ] || continue
        case "$built" in
            *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$built" "$GPU_DIR/whl/" ;;
            *) echo "error: $built is not pure Python: it cannot be built here for the GPU machine" >&2; exit 1 ;;
        esac
    done
    rmdir "$GPU_DIR/build"
    # Writable copies (the shared inputs may be read-only), so that prepare can run again over them.
    rm -rf "$GPU_DIR/tiktoken" "$GPU_DIR/tinyshakespeare.txt" "$GPU_DIR/hellaswag_val.jsonl"
    cp -r --no-preserve=mode "$SHARED/tiktoken" "$GPU_DIR/tiktoken"
    cp --no-preserve=mode "$SHARED/data/tinyshakespeare.txt" "$SHARED/data/hellaswag_val.jsonl" "$GPU_DIR/"
    echo "carried $(wc -l <"$GPU_DIR/carry.txt") packages: $(tr '\n' ' ' <"$GPU_DIR/carry.txt")"
    du -sh "$GPU_DIR"
    exit 0
fi

case "$MODE" in
    gpu)  # GPT-2 124M as its recipe ships, on one GPU
        DEVICE=cuda RECIPE=configs/train/gpt2-124m-edu10B.yaml UPDATES=20 BUDGET=${GPU_CHECK_SECONDS:-290}
        BATCH=(--set batch.total_tokens=65536)  # micro batch 64 as shipped, one micro step per update
        HS_LIMIT=() AGREE_DOCS=500 PLAN=(--model gpt2 --micro-batch 16 --seq-len 1024) SDPA=(gpt2 8 1024)
        # seconds: install, versions + imports, attention, data, each eager run, compiled, HellaSwag, agreement, plan
        L_INSTALL=40 L_CHECK=30 L_PREP=30 L_EAGER=50 L_COMPILED=100 L_HS=80 L_AGREE=40 L_PLAN=40 ;;
    dry-run)  # the same steps on this CPU: tiny model, a few updates, 20 docs
        DEVICE=cpu RECIPE=configs/train/tiny-cpu.yaml UPDATES=8 BUDGET=${GPU_CHECK_SECONDS:-3600}
        BATCH=(--set batch.total_tokens=256 --set batch.micro_batch=4)
        HS_LIMIT=(--limit 20) AGREE_DOCS=20 PLAN=(--model tiny --micro-batch 2 --seq-len 256) SDPA=(tiny 2 64)
        L_INSTALL=300 L_CHECK=300 L_PREP=300 L_EAGER=600 L_COMPILED=900 L_HS=600 L_AGREE=600 L_PLAN=300 ;;
    *) echo "usage: bench/gpu_check.sh [prepare|dry-run]" >&2; exit 2 ;;
esac
[ -f "$GPU_DIR/requirements.txt" ] || { echo "error: $GPU_DIR/requirements.txt not found: run bench/gpu_check.sh prepare" \
    "on a machine with network first" >&2; exit 1; }
export TIKTOKEN_CACHE_DIR=$PWD/$GPU_DIR/tiktoken PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
SITE=$WORK/site  # only what pip finds missing beside the image's packages: nothing in it shadows one of them
export PYTHONPATH=$SITE:$PWD
LOGS=${OUT:-$GPU_DIR/logs}  # the log and every step's output, kept
mkdir -p "$LOGS"
LOG=$LOGS/gpu_check.log
: >"$LOG"
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
say() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$LOG"; }
# A step gets at most its own limit and what is left of BUDGET; one that overruns is stopped (TERM, then KILL 20 s
# later: train saves and exits 99 on TERM) and reported, and the later steps still run.
step() {
    local limit=$1 out=$2 left=$(( BUDGET - ($(date +%s) - started) )); shift 2
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then say "skipped (budget spent): $*"; return 0; fi
    say "$(echo "$*" | head -n 1 | cut -c 1-400)"
    local rc=0
    timeout --kill-after=20 "$limit" "$@" >"$out" 2>&1 || rc=$?
    tail -n 5 "$out" | tee -a "$LOG"
    [ "$rc" = 0 ] || say "exit $rc (limit ${limit}s): $*"
}

# 1. preflight. pip decides against this Python's own packages what is missing; only that is installed, into SITE.
step "$L_INSTALL" "$WORK/install.out" "$PY" -m pip install --dry-run --no-index --find-links "$GPU_DIR/whl" \
    --report "$WORK/pip.json" -r "$GPU_DIR/requirements.txt"
[ -f "$WORK/pip.json" ] || { say "error: pip cannot install $(tr '\n' ' ' <"$GPU_DIR/requirements.txt")beside this" \
    "Python's packages from $GPU_DIR/whl (its message is above)"; exit 1; }
"$PY" -c 'import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(item["download_info"]["url"].removeprefix("file://"))' "$WORK/pip.json" >"$WORK/missing.txt"
if [ -s "$WORK/missing.txt" ]; then
    step "$L_INSTALL" "$WORK/install2.out" "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --target "$SITE" $(cat "$WORK/missing.txt")
fi
say "installed $(wc -l <"$WORK/missing.txt") packages from $GPU_DIR/whl; $(cat /proc/cpuinfo | grep -m1 'model name' | cut -d: -f2)"
[ "$DEVICE" = cuda ] && say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
step "$L_CHECK" "$WORK/versions.out" "$PY" -c 'import torch, deepspeed, lm_eval, transformers, datasets, eval.lm, train.trainer
from importlib.metadata import version
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "deepspeed", deepspeed.__version__, "lm-eval", version("lm_eval"), "transformers", transformers.__version__,
      "datasets", datasets.__version__)'
# The model's own block, bf16 autocast, causal: the profiler must see the flash kernel forward and backward.
step "$L_CHECK" "$WORK/sdpa.out" "$PY" - "$DEVICE" "${SDPA[@]}" <<'EOF'
import sys, torch
from torch.profiler import profile
from model.config import GPTConfig
from model.gpt import GPT
device, preset, batch, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = GPTConfig.resolve(preset)
block = GPT(config).transformer.h[0].to(device)
x = torch.randn(batch, seq, config.n_embd, device=device, requires_grad=True)
with profile() as prof, torch.autocast(device, dtype=torch.bfloat16):
    block(x).float().sum().backward()
ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key})
print("attention ops:", ", ".join(ops))
flash = [op for op in ops if "_flash_attention" in op]
if not any("backward" in op for op in flash) or not any("backward" not in op for op in flash):
    sys.exit("error: the model's causal bf16 attention did not run the flash kernel forward and backward")
EOF

# 2. data: one document per speech, as the tests make it; val 70,000 tokens > 64 windows of 1,025.
"$PY" -c 'import json, sys
for block in open(sys.argv[1], encoding="utf-8").read().split("\n\n"):
    if block.strip():
        print(json.dumps({"text": block.strip()}))' "$GPU_DIR/tinyshakespeare.txt" >"$WORK/docs.jsonl"
DS=$WORK/ds
step "$L_PREP" "$WORK/prep.out" "$PY" -m prep tokenize --input "$WORK/docs.jsonl" --out "$DS" \
    --shard-tokens 100000 --val-tokens 70000

# 3-4. the trainer: eager as shipped, eager with DeepSpeed's throughput timer on (a DeepSpeed file that sets it
# wins over the trainer's default), compiled as shipped.
"$PY" -c 'import json, sys
ds = json.load(open(sys.argv[1])); ds["timers"] = {"throughput": {"enabled": True, "synchronized": True}}
json.dump(ds, open(sys.argv[2], "w"), indent=2)' configs/deepspeed/zero1.json "$WORK/zero1-timer-on.json"
TRAIN=("$PY" -m train --config "$RECIPE" --set data.dir="$DS" "${BATCH[@]}" --set schedule.max_steps=$UPDATES
       --set optim.warmup_steps=2 --set eval.every=0 --set sample.every=0 --set checkpoint.every=0
       --set log.tensorboard=false)
step "$L_EAGER" "$WORK/eager.out" "${TRAIN[@]}" --set run_dir="$WORK/eager" --set compile=false
step "$L_EAGER" "$WORK/eager-timer-on.out" "${TRAIN[@]}" --set run_dir="$WORK/eager-timer-on" \
    --set compile=false --set deepspeed="$WORK/zero1-timer-on.json"
step "$L_COMPILED" "$WORK/compiled.out" env TORCH_LOGS=graph_breaks,recompiles "${TRAIN[@]}" \
    --set run_dir="$WORK/compiled" --set compile=true

# 5. HellaSwag on the checkpoint the eager run saved: the full set as the product runs it, then bf16 vs fp32.
step "$L_HS" "$WORK/hellaswag.out" "$PY" -m eval checkpoint "$WORK/eager" \
    --hellaswag-file "$GPU_DIR/hellaswag_val.jsonl" --batch-size 64 --device "$DEVICE" --dtype bf16 \
    "${HS_LIMIT[@]}" --out "$WORK/hellaswag.json"
step "$L_AGREE" "$WORK/agreement.out" "$PY" bench/bench_eval.py --hellaswag-file "$GPU_DIR/hellaswag_val.jsonl" \
    --checkpoint "$WORK/eager" --device "$DEVICE" --batch-size 64 --limit "$AGREE_DOCS" --dtypes bf16,fp32 \
    --json "$WORK/agreement.json"

# 6. model plan's memory against one real step of the trainer's engine.
step "$L_PLAN" "$WORK/plan.out" "$PY" bench/bench_plan_memory.py --device "$DEVICE" "${PLAN[@]}" \
    --deepspeed configs/deepspeed/zero1.json --json

say "rows for docs/benchmarks.md"
"$PY" - "$WORK" "$MODE" <<'EOF' | tee -a "$LOG"
import json, re, statistics, sys
from pathlib import Path
work, mode = Path(sys.argv[1]), sys.argv[2]
def tail(name):
    path = work / name
    return path.read_text(errors="replace") if path.exists() else ""
def last_json(name):
    lines = [l for l in tail(name).splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else None
print(f"| preflight | {(tail('versions.out').strip().splitlines() or ['failed'])[-1]} | "
      f"{(tail('sdpa.out').strip().splitlines() or ['failed'])[-1]} |")
for run, what in (("eager", "eager, as shipped"), ("eager-timer-on", "eager, DeepSpeed's throughput timer on"),
                  ("compiled", "compiled, as shipped")):
    metrics = work / run / "metrics.jsonl"
    steady = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r][5:] \
        if metrics.exists() else []
    extra = ""
    if run == "compiled":
        log = tail("compiled.out")
        extra = (f"; graph breaks {len(re.findall(r'Graph break', log))}, "
                 f"recompiles {len(re.findall(r'Recompiling function', log))}")
    if not steady:
        print(f"| python -m train, {what} | failed or too few updates: see {run}.out{extra} |")
        continue
    med = lambda k: statistics.median(r[k] for r in steady if r.get(k) is not None)
    mfu = f"MFU {med('mfu'):.3f}" if any(r.get("mfu") is not None for r in steady) else "MFU n/a (CPU)"
    print(f"| python -m train, {what} | {len(steady)} updates after 5 | {mfu} | {med('tokens_per_s'):,.0f} tokens/s | "
          f"step {1e3 * med('step_time_s'):.1f} ms | data wait median {med('data_wait_ms'):.2f} ms, max "
          f"{max(r['data_wait_ms'] for r in steady):.2f} ms{extra} |")
hs = work / "hellaswag.json"
if hs.exists():
    r = json.loads(hs.read_text())
    h = r["tasks"]["hellaswag"]
    print(f"| python -m eval checkpoint, HellaSwag, batch 64, {r['dtype']} | {h['n_docs']} docs | acc_norm "
          f"{h['acc_norm']:.4f} +- {1.96 * h['acc_norm_stderr']:.4f} | wall {r['wall_time_s']:.1f} s (tasks "
          f"{r['timings']['tasks_s']:.1f}, model {r['timings']['model_s']:.1f}, scoring {r['timings']['score_s']:.1f}) |")
else:
    print("| python -m eval checkpoint, HellaSwag | failed: see hellaswag.out |")
agree = work / "agreement.json"
if agree.exists():
    a = json.loads(agree.read_text())
    print(f"| bf16 (LM head fp32) vs fp32 scoring | {a['docs']} docs | acc_norm decisions differing "
          f"{a['decisions_differing']} | largest log-likelihood difference {a['max_abs_loglik_diff']:.2e} | "
          f"acc_norm {a['acc_norm']['bf16']:.4f} vs {a['acc_norm']['fp32']:.4f} |")
else:
    print("| bf16 vs fp32 scoring | failed: see agreement.out |")
plan = last_json("plan.out")
if plan:
    print(f"| bench_plan_memory --device {plan['device']} --model {plan['model']} --micro-batch {plan['micro_batch']} | "
          f"estimate {plan['estimate_bytes'] / 2**30:.3f} GiB | measured {plan['measured_bytes'] / 2**30:.3f} GiB | "
          f"ratio {plan['ratio']:.3f} |")
else:
    print("| bench_plan_memory | failed: see plan.out |")
EOF
cp "$WORK"/*.out "$WORK"/*.json "$LOGS/" 2>/dev/null || true
say "done in $(( $(date +%s) - started )) s; the whole log: $LOG"
