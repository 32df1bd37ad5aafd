#!/bin/sh
# The demo's training stage (configs/pipelines/tiny-local.env's recipe and overrides) on a cold account: HOME an
# empty directory, so nothing the account cached (~/.cache/torch_extensions) helps.
#   bench/demo_train_stage.sh CHECKOUT RUN_DIR DATASET      (PYTHON defaults to this checkout's .venv/bin/python)
# RUN_DIR is replaced. The start time goes to RUN_DIR.start: the first line of RUN_DIR/metrics.jsonl has the first
# step's "time", so start-up = that - the start.
set -e
python="${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}"
rm -rf "$2"
date +%s.%N > "$2.start"
HOME="$(mktemp -d)"
export HOME
cd "$1"
exec "$python" -m train --config configs/train/tiny-cpu.yaml --set data.dir="$3" --set run_dir="$2" \
    --set schedule.max_steps=40 --set optim.warmup_steps=4 --set checkpoint.every=20 --set eval.every=20 \
    --set sample.every=20
