#!/usr/bin/env bash
# Every measurement of docs/benchmarks.md that needs a GPU, in one go on one GPU, in at most 8 minutes:
#   1. GPT-2 124M MFU, eager and compiled, micro batch 16 and 32 (bench/bench_train.py: plain loop vs trainer)
#   2. the loader's data wait in a real 124M training run (data_wait_ms of RUN/metrics.jsonl; MFU and step time
#      beside it), and bench/bench_scale.py's cold-cache rows on this machine's disk
#   3. full HellaSwag (10,042 docs) for the 124M checkpoint that run wrote (python -m eval checkpoint; the target is
#      <= 60 s), and bench/bench_eval.py's side-by-side ratio on its first 500 docs
#   4. model plan's memory estimate against torch.cuda.max_memory_allocated (bench/bench_plan_memory.py)
# and prints the rows for docs/benchmarks.md at the end. By hand only: the tests never run it.
#
#   bench/gpu_check.sh prepare   # on a machine with network, from the repo root: fills .gpu/ (see below)
#   bench/gpu_check.sh           # on the GPU machine, from the repo root, with .gpu/ beside the code
#
# A bare GPU image has torch but neither DeepSpeed nor lm-eval, and often no network. DeepSpeed is published only
# as a source package: `prepare` builds it into a wheel here (pure Python; its CUDA ops compile on first use), and
# downloads the other missing packages as wheels for the GPU machine's Python (GPU_PYTHON_VERSION, default 3.12).
# Carry the whole .gpu/ folder to the GPU machine (.gitignore keeps it out of git). It also
# holds the inputs the tests read from ../shared: tiktoken's GPT-2 files, Tiny Shakespeare, HellaSwag.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
SHARED=${PIPELINE_SHARED:-../shared}
PY=${PYTHON:-python3}  # prepare: the Python that has this project's packages installed (e.g. .venv/bin/python)
# The image's packages (a stock CUDA + torch image: numpy, transformers, pyarrow, ... are there); `prepare` carries
# every other package that DeepSpeed and lm-eval need, at the versions installed here (what the tests use).
IMAGE_HAS="accelerate aiohttp certifi filelock fsspec huggingface-hub hf-xet jinja2 joblib msgpack ninja numpy
nvidia-ml-py packaging pandas peft psutil py-cpuinfo pyarrow pybind11 python-dateutil pyyaml regex requests sacrebleu
safetensors scikit-learn scipy sympy tabulate tiktoken tokenizers torch tqdm transformers typing-extensions urllib3
xxhash einops portalocker colorama lxml"

if [ "${1:-}" = prepare ]; then
    mkdir -p "$GPU_DIR/whl"
    missing=$("$PY" - "$IMAGE_HAS" <<'EOF'
import importlib.metadata as m, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have, seen, out = {norm(n) for n in sys.argv[1].split()}, set(), []
def walk(name):
    if norm(name) in seen:
        return
    seen.add(norm(name))
    try:
        reqs = m.requires(name) or []
    except m.PackageNotFoundError:  # an optional or other-platform requirement
        return
    if norm(name) not in have:
        out.append(f"{name}=={m.version(name)}")
    for r in reqs:
        if "extra ==" not in r:
            walk(re.split(r"[ ;<>=!~\[(]", r, 1)[0])
walk("deepspeed"), walk("lm-eval")
print(" ".join(out))
EOF
)
    ds_spec=$(echo "$missing" | tr ' ' '\n' | grep -i '^deepspeed==')
    "$PY" -m pip wheel --no-deps --no-build-isolation -w "$GPU_DIR/whl" "$ds_spec"
    # shellcheck disable=SC2046
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$GPU_DIR/whl" \
        $(echo "$missing" | tr ' ' '\n' | grep -vi '^deepspeed==')
    cp -r "$SHARED/tiktoken" "$GPU_DIR/tiktoken"
    cp "$SHARED/data/tinyshakespeare.txt" "$SHARED/data/hellaswag_val.jsonl" "$GPU_DIR/"
    du -sh "$GPU_DIR"
    exit 0
fi

if ls "$GPU_DIR"/whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
        "$GPU_DIR"/whl/*.whl
    export PYTHONPATH=/tmp/gpu_check_site:$PWD
else
    export PYTHONPATH=$PWD
fi
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/$GPU_DIR/tiktoken}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG=${OUT:-$WORK}/gpu_check.log
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
say() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$LOG"; }
BUDGET=${GPU_CHECK_SECONDS:-440}  # 8 minutes less the kill grace of one step and the set-up
# A step gets at most its own limit and what is left of BUDGET; one that overruns is stopped and reported, and the
# others still run, so the whole check ends within BUDGET (plus tokenizing Tiny Shakespeare and the summary).
step() {
    local limit=$1 left=$(( BUDGET - ($(date +%s) - started) )); shift
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then say "skipped (budget spent): $*"; return; fi
    # TERM first (train saves and exits 99 on it), KILL 20 s later.
    say "$*"; timeout --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG" || say "exit $? (limit ${limit}s): $*"
}

say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader); $("$PY" -c \
    'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)')"
# Tiny Shakespeare, one document per speech (as the tests make it): the data do not change the speed.
"$PY" -c 'import json, sys
for block in open(sys.argv[1], encoding="utf-8").read().split("\n\n"):
    if block.strip():
        print(json.dumps({"text": block.strip()}))' "$GPU_DIR/tinyshakespeare.txt" >"$WORK/docs.jsonl"
"$PY" -m prep tokenize --input "$WORK/docs.jsonl" --out "$WORK/ds" --shard-tokens 100000 --val-tokens 20000 \
    >>"$LOG" 2>&1
DS=$WORK/ds
GPT2=(--preset gpt2 --padded-vocab-size 50304 --seq-len 1024 --precision bf16 --steps 16 --skip 6 --rounds 1)

# 1. MFU: 64 sequences of 1,024 per step either way.
for mb in 16 32; do
    for compile in "" --compile; do
        step 100 "$PY" bench/bench_train.py --dataset "$DS" "${GPT2[@]}" --micro-batch $mb \
            --grad-accum $((64 / mb)) $compile
    done
done

# 2. The recipe itself for 30 updates of 64 x 1,024 (data wait, MFU), saving one 124M checkpoint for step 3.
RUN=$WORK/run
step 150 "$PY" -m train --config configs/train/gpt2-124m-edu10B.yaml --set data.dir="$DS" --set run_dir="$RUN" \
    --set batch.total_tokens=65536 --set batch.micro_batch=16 --set schedule.max_steps=30 --set eval.every=0 \
    --set sample.every=0 --set checkpoint.every=0 --set log.tensorboard=false --set compile=true
step 70 "$PY" bench/bench_scale.py --sizes 350e9 --cold-gb 1 --cold-ranks 8 --cold-steps 150

# 3. HellaSwag on the 124M checkpoint: the full set through the product, then the side-by-side ratio.
step 120 "$PY" -m eval checkpoint "$RUN" --hellaswag-file "$GPU_DIR/hellaswag_val.jsonl" --batch-size 64 \
    --device cuda --out "$WORK/hellaswag.json"
step 100 "$PY" bench/bench_eval.py --hellaswag-file "$GPU_DIR/hellaswag_val.jsonl" --checkpoint "$RUN" \
    --device cuda --batch-size 32 --limit 500

# 4. model plan's memory against one real step.
step 60 "$PY" bench/bench_plan_memory.py --device cuda --model gpt2 --micro-batch 16 --seq-len 1024 \
    --deepspeed configs/deepspeed/zero1.json

say "rows for docs/benchmarks.md"
"$PY" - "$RUN" "$WORK/hellaswag.json" <<'EOF' | tee -a "$LOG"
import json, statistics, sys
from pathlib import Path
run, hs = Path(sys.argv[1]), Path(sys.argv[2])
if (run / "metrics.jsonl").exists():
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in lines if "loss" in r][5:]  # after compilation
    if steady:
        med = lambda k: statistics.median(r[k] for r in steady)
        print(f"| python -m train gpt2 124M, 16 x 1024 x 4, bf16, ZeRO-1, compile | {len(steady)} updates | "
              f"MFU {med('mfu'):.3f} | step {1e3 * med('step_time_s'):.0f} ms | data wait median "
              f"{med('data_wait_ms'):.2f} ms, max {max(r['data_wait_ms'] for r in steady):.2f} ms "
              f"({100 * med('data_wait_ms') / (1e3 * med('step_time_s')):.2f}% of the step) |")
if hs.exists():
    r = json.loads(hs.read_text())
    h = r["tasks"]["hellaswag"]
    print(f"| python -m eval checkpoint, full HellaSwag, batch 64 | {h['n_docs']} docs | acc_norm {h['acc_norm']:.4f} "
          f"+- {1.96 * h['acc_norm_stderr']:.4f} | wall {r['wall_time_s']:.1f} s (tasks {r['timings']['tasks_s']:.1f}, "
          f"model {r['timings']['model_s']:.1f}, scoring {r['timings']['score_s']:.1f}) |")
EOF
say "done in $(( $(date +%s) - started )) s; the whole log: $LOG"
