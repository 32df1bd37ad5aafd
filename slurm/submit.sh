#!/bin/bash
# Submit the whole pipeline: download -> tokenize (array) -> finalize -> train (multi-node) -> eval watch,
# chained with --dependency=afterok. With EVAL_MODE=jobs (the default) the eval watcher is a CPU-only job that
# submits one short GPU job per complete checkpoint (slurm/eval.sbatch); EVAL_MODE=watch scores them itself on a
# GPU it holds for as long as training runs. Everything is checked before the first sbatch, so a bad input never
# leaves a half-submitted chain; a prepared dataset with the same recipe is reused (no prep jobs).
#
#   slurm/submit.sh PIPELINE.env             submit to Slurm (site settings: the SITE file the pipeline names)
#   slurm/submit.sh PIPELINE.env --dry-run   print the sbatch lines, submit nothing
#   slurm/submit.sh PIPELINE.env --local     run the same stages in order on this machine, no Slurm
#
# Relative paths in the pipeline and site files are taken from the current directory (the repository root).
set -euo pipefail
SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PIPELINE_REPO="${PIPELINE_REPO:-$(dirname "$SLURM_DIR")}"
source "$SLURM_DIR/common.sh"

usage() {
    echo "usage: slurm/submit.sh PIPELINE.env [--local] [--dry-run]" >&2
    exit 2
}

MODE=slurm
DRY_RUN=0
PIPELINE_ARG=""
for arg in "$@"; do
    case "$arg" in
        --local) MODE=local ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage ;;
        -*) echo "error: unknown option $arg" >&2; usage ;;
        *) [ -z "$PIPELINE_ARG" ] || usage; PIPELINE_ARG="$arg" ;;
    esac
done
[ -n "$PIPELINE_ARG" ] || usage
load_pipeline "$PIPELINE_ARG"
setup_env

# --- validation: nothing is submitted or run unless all of it passes -------------------------------------
is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

validate() {
    local key
    for key in NODES GPUS_PER_NODE PREP_TASKS PREP_WORKERS FINALIZE_TASKS; do
        is_count "${!key}" || die "$key must be a positive whole number, got '${!key}'"
    done
    case "$EVAL_MODE" in
        jobs|watch) ;;
        *) die "EVAL_MODE must be jobs (a short eval job per checkpoint) or watch (one eval job beside training), got '$EVAL_MODE'" ;;
    esac
    if [ "$MODE" = slurm ]; then
        # (a SITE that names a missing file is refused by load_pipeline, for jobs and --local alike)
        [ -n "${SITE:-}" ] || die "$PIPELINE_FILE sets no SITE: copy slurm/site.env.example to slurm/site.env, edit it, set SITE=slurm/site.env"
        for key in SITE_GPUS_PER_NODE SITE_CPUS_PER_NODE SITE_SIGNAL_SECONDS; do
            [[ "${!key:-}" =~ ^[0-9]+$ ]] || die "$SITE: $key must be a whole number, got '${!key:-}'"
        done
        is_count "$SITE_CPUS_PER_NODE" || die "$SITE: SITE_CPUS_PER_NODE must be at least 1"
        if [ "$SITE_GPUS_PER_NODE" -gt 0 ] && [ "$GPUS_PER_NODE" -gt "$SITE_GPUS_PER_NODE" ]; then
            die "GPUS_PER_NODE=$GPUS_PER_NODE but the site's nodes have $SITE_GPUS_PER_NODE GPUs"
        fi
        [ "$DRY_RUN" = 1 ] || command -v sbatch > /dev/null || die "sbatch not found: is this a Slurm login node? (or use --local)"
    elif [ "$NODES" -gt 1 ]; then
        die "--local runs on one machine, but NODES=$NODES"
    fi
    [ -f "$TRAIN_RECIPE" ] || die "training recipe not found: $TRAIN_RECIPE"
    [ -f "$HELLASWAG" ] || die "HellaSwag file not found: $HELLASWAG (write it on a machine with internet: python -m prep eval-data --out $(dirname "$HELLASWAG"))"
    case "$PREP_SOURCE" in
        local) tokenize_inputs
               local p
               for p in "${TOKENIZE_INPUTS[@]}"; do [ -e "$p" ] || die "PREP_INPUT not found: $p"; done ;;
        fineweb|fineweb-edu) ;;
        *) die "PREP_SOURCE must be fineweb-edu, fineweb or local, got '$PREP_SOURCE'" ;;
    esac
    check_mix
    check_recipe
    check_dataset
}

# TRAIN_MIX: train reads DATASET_DIR and datasets prepared before. This pipeline prepares only DATASET_DIR, so
# it must be one of the mix, and every other one must be finished now: a missing one would fail the train job
# after prep had run for hours.
check_mix() {
    train_mix
    [ -n "$TRAIN_MIX_VALUE" ] || return 0
    local d own listed=0
    own="$(realpath -m "$DATASET_DIR")"
    for d in "${TRAIN_MIX_DIRS[@]}"; do [ "$(realpath -m "$d")" != "$own" ] || listed=1; done
    [ "$listed" = 1 ] || die "TRAIN_MIX does not list DATASET_DIR ($DATASET_DIR), the dataset this pipeline prepares: add it as an entry (\"\$DATASET_DIR=WEIGHT\")"
    for d in "${TRAIN_MIX_DIRS[@]}"; do
        [ "$(realpath -m "$d")" = "$own" ] || [ -f "$d/manifest.json" ] \
            || die "TRAIN_MIX: $d is not a finished dataset (no manifest.json); this pipeline prepares only DATASET_DIR, so prepare $d first (python -m prep tokenize --input ... --out $d)"
    done
}

# A stage's one-line `error: ...` message (every Python entry point prints one), or its last line when it died
# some other way.
first_error() {
    local line
    line="$(grep -m1 '^error: ' <<< "$1" || tail -n 1 <<< "$1")"
    echo "${line#error: }"
}

# The recipe, checked by the trainer's own recipe code for the job's world size (keys, model shape, DeepSpeed
# file, and a batch that divides over NODES x GPUS_PER_NODE processes).
check_recipe() {
    train_set_flags
    local out
    if ! out="$("$PYTHON" "$SLURM_DIR/check_recipe.py" --config "$TRAIN_RECIPE" "${TRAIN_SET_FLAGS[@]}" \
            --world-size $((NODES * GPUS_PER_NODE)) 2>&1)"; then
        die "recipe $TRAIN_RECIPE fails for $NODES node(s) x $GPUS_PER_NODE process(es): $(first_error "$out")"
    fi
    echo "$out"
}

# PREP_NEEDED=0 when DATASET_DIR already holds a finished dataset made with this pipeline's recipe. prep
# itself decides: a tokenize rerun on a finished dataset does nothing, and refuses a different recipe.
check_dataset() {
    PREP_NEEDED=1
    [ -f "$DATASET_DIR/manifest.json" ] || return 0
    PREP_NEEDED=0
    tokenize_inputs
    local p
    for p in "${TOKENIZE_INPUTS[@]}"; do
        if [ ! -e "$p" ]; then
            echo "note: reusing $DATASET_DIR; its inputs ($p) are gone, so its recipe is not re-checked"
            return 0
        fi
    done
    tokenize_flags
    local out
    out="$("$PYTHON" -m prep tokenize --input "${TOKENIZE_INPUTS[@]}" --out "$DATASET_DIR" \
        "${TOKENIZE_FLAGS[@]}" 2>&1)" || die "dataset $DATASET_DIR exists but does not match this pipeline: $(first_error "$out")"
    echo "reusing dataset $DATASET_DIR (same recipe): no prep jobs"
}

# --- the stages ----------------------------------------------------------------------------------------
# Each stage: name, script, and (under Slurm) its sbatch resources; dependencies are wired in submit_chain.
STAGES=()
plan_stages() {
    if [ "$PREP_NEEDED" = 1 ]; then
        [ "$PREP_SOURCE" = local ] || STAGES+=(prep_download)
        STAGES+=(prep_tokenize prep_finalize)
        finalize_tasks
    fi
    STAGES+=(train eval_watch)
}

# FINALIZE_N: the finalize array's size, one task per FINALIZE_SHARDS_PER_TASK train shards of the dataset to
# come, at most FINALIZE_TASKS. A task copies a 100M-token shard in a few seconds (docs/benchmarks.md), so 16 of
# them keep its start-up (Python, reading the units' markers and the shard layout) a small part of its time. The
# dataset does not exist yet, so its size is estimated: a Hub sample by its name (10BT: 1e10 tokens), local
# inputs at one token per 2 bytes on disk (text runs 4-5 bytes a GPT-2 token; compressed inputs fewer). A wrong
# guess costs only balance: an extra task finds no shard of its own and exits, a missing one leaves more to each.
FINALIZE_SHARDS_PER_TASK=16
finalize_tasks() {
    local tokens
    if [ "$PREP_SOURCE" = local ]; then
        tokenize_inputs
        tokens=$(( $(du -sbLc "${TOKENIZE_INPUTS[@]}" | tail -n 1 | cut -f1) / 2 ))
    elif [[ "$PREP_SAMPLE" =~ ^([0-9]+)BT$ ]]; then
        tokens=$(( BASH_REMATCH[1] * 1000000000 ))
    else
        FINALIZE_N=$FINALIZE_TASKS
        return
    fi
    local shards=$(( (tokens + PREP_SHARD_TOKENS - 1) / PREP_SHARD_TOKENS ))
    FINALIZE_N=$(( (shards + FINALIZE_SHARDS_PER_TASK - 1) / FINALIZE_SHARDS_PER_TASK ))
    [ "$FINALIZE_N" -ge 1 ] || FINALIZE_N=1
    [ "$FINALIZE_N" -le "$FINALIZE_TASKS" ] || FINALIZE_N=$FINALIZE_TASKS
}

# --- local: the same scripts, one after another ----------------------------------------------------------
run_local() {
    mkdir -p "$LOG_DIR"
    local stage log status i tasks
    for stage in "${STAGES[@]}"; do
        log="$LOG_DIR/$stage-local.out"
        : > "$log"
        tasks=0   # an array's tasks run in turn (a 1-task finalize array runs as the plain command)
        [ "$stage" != prep_tokenize ] || tasks=$PREP_TASKS
        [ "$stage" != prep_finalize ] || [ "$FINALIZE_N" = 1 ] || tasks=$FINALIZE_N
        if [ "$tasks" -gt 0 ]; then
            for ((i = 0; i < tasks; i++)); do
                status=0
                TASK_INDEX=$i TASK_COUNT=$tasks STAGE_LOG="$log" \
                    bash "$SLURM_DIR/$stage.sbatch" "$PIPELINE_FILE" 2>&1 | tee -a "$log" || status=$?
                [ "$status" = 0 ] || break
            done
        else
            status=0
            STAGE_LOG="$log" bash "$SLURM_DIR/$stage.sbatch" "$PIPELINE_FILE" 2>&1 | tee -a "$log" || status=$?
        fi
        if [ "$status" != 0 ]; then
            echo "error: stage $stage failed (exit $status); log: $log" >&2
            local rest=("${STAGES[@]}")
            rest=("${rest[@]:$(( $(index_of "$stage") + 1 ))}")
            [ "${#rest[@]}" = 0 ] || echo "not run: ${rest[*]}" >&2
            exit 1
        fi
    done
    echo "pipeline finished: dataset $DATASET_DIR, run $RUN_DIR"
    echo "report: $RUN_DIR/eval/report.md"
}

index_of() {
    local i
    for i in "${!STAGES[@]}"; do [ "${STAGES[$i]}" != "$1" ] || { echo "$i"; return; }; done
}

# --- Slurm: one sbatch per stage, each waiting for the one before ------------------------------------------
site_flags() {
    SITE_FLAGS=(--parsable --chdir="$PWD" --kill-on-invalid-dep=yes)
    [ -z "${SITE_PARTITION:-}" ] || SITE_FLAGS+=(--partition="$SITE_PARTITION")
    [ -z "${SITE_ACCOUNT:-}" ] || SITE_FLAGS+=(--account="$SITE_ACCOUNT")
    [ -z "${SITE_QOS:-}" ] || SITE_FLAGS+=(--qos="$SITE_QOS")
    SITE_FLAGS+=("${SITE_SBATCH_EXTRA[@]}")
}

# stage_flags STAGE: STAGE_FLAGS = its resources, time limit and log file.
stage_flags() {
    local stage="$1" gpu="${SITE_GPU_GRES:-gpu}"
    STAGE_FLAGS=(--job-name="$stage" --output="$LOG_DIR/$stage-%j.out")
    case "$stage" in
        prep_download)
            STAGE_FLAGS+=(--nodes=1 --ntasks=1 --cpus-per-task=1 --time="${SITE_TIME_PREP:-04:00:00}") ;;
        prep_tokenize)
            STAGE_FLAGS=(--job-name="$stage" --output="$LOG_DIR/$stage-%A_%a.out" --array="0-$((PREP_TASKS - 1))"
                         --nodes=1 --ntasks=1 --cpus-per-task="$PREP_WORKERS" --time="${SITE_TIME_PREP:-04:00:00}") ;;
        prep_finalize)
            # PREP_WORKERS CPUs, as a tokenize task: finalizing a share takes one, but the task that completes the
            # dataset then verifies all of it (700 GB at 350BT) with a process per CPU it was given.
            STAGE_FLAGS=(--job-name="$stage" --output="$LOG_DIR/$stage-%A_%a.out" --array="0-$((FINALIZE_N - 1))"
                         --nodes=1 --ntasks=1 --cpus-per-task="$PREP_WORKERS" --time="${SITE_TIME_PREP:-04:00:00}") ;;
        train)
            STAGE_FLAGS+=(--nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE"
                          --cpus-per-task=$((SITE_CPUS_PER_NODE / GPUS_PER_NODE > 0 ? SITE_CPUS_PER_NODE / GPUS_PER_NODE : 1))
                          --time="${SITE_TIME_TRAIN:-48:00:00}" --signal=USR1@"$SITE_SIGNAL_SECONDS"
                          --requeue --open-mode=append)
            [ "$SITE_GPUS_PER_NODE" = 0 ] || STAGE_FLAGS+=(--gpus-per-node="$gpu:$GPUS_PER_NODE") ;;
        eval_watch)   # runs as long as training; with EVAL_MODE=jobs it only submits, so no GPU
            if [ "$EVAL_MODE" = jobs ]; then
                STAGE_FLAGS+=(--nodes=1 --ntasks=1 --cpus-per-task=1 --time="${SITE_TIME_EVAL:-48:00:00}")
            else
                STAGE_FLAGS+=(--nodes=1 --ntasks=1 --cpus-per-task="${SITE_EVAL_CPUS:-1}" --time="${SITE_TIME_EVAL:-48:00:00}")
                [ "$SITE_GPUS_PER_NODE" = 0 ] || STAGE_FLAGS+=(--gpus-per-node="$gpu:1")
            fi ;;
        eval)         # one checkpoint's evaluation, submitted by eval_watch (EVAL_MODE=jobs)
            STAGE_FLAGS+=(--nodes=1 --ntasks=1 --cpus-per-task="${SITE_EVAL_CPUS:-1}" --time="${SITE_TIME_EVAL_JOB:-01:00:00}")
            [ "$SITE_GPUS_PER_NODE" = 0 ] || STAGE_FLAGS+=(--gpus-per-node="$gpu:1") ;;
    esac
}

# Print a command with each argument quoted so it can be pasted back into a shell.
show_cmd() {
    local out="" a
    for a in "$@"; do out+="$(printf '%q' "$a") "; done
    echo "${out% }"
}

# EVAL_MODE=jobs: the sbatch line of one checkpoint's eval job, less its TAG, as the shell words the watcher
# splits again (`eval watch --submit`; Python's shlex reads bash's ${a@Q} quoting).
eval_job_submit() {
    stage_flags eval
    local cmd=(sbatch "${SITE_FLAGS[@]}" "${STAGE_FLAGS[@]}" "$SLURM_DIR/eval.sbatch" "$1") quoted=() a
    for a in "${cmd[@]}"; do
        [[ "$a" != *[[:cntrl:]]* ]] || die "an sbatch argument of the eval jobs holds a control character: ${a@Q}"
        quoted+=("${a@Q}")
    done
    EVAL_JOB_SUBMIT="${quoted[*]}"
}

SUBMITTED=()   # job ids so far: cancelled if a later sbatch fails, so no half-submitted chain survives
submit_chain() {
    # Jobs read the pipeline file when they start, hours later perhaps: give them a copy of it as submitted,
    # so editing the file for the next run cannot change a chain already in the queue.
    local job_pipeline="$PIPELINE_FILE"
    if [ "$DRY_RUN" = 0 ]; then
        mkdir -p "$LOG_DIR"
        job_pipeline="$LOG_DIR/pipeline-$(date -u +%Y%m%dT%H%M%SZ).env"
        cp "$PIPELINE_FILE" "$job_pipeline"
    fi
    site_flags
    if [ "$EVAL_MODE" = jobs ]; then
        eval_job_submit "$job_pipeline"
        if [ "$DRY_RUN" = 1 ]; then
            echo "eval jobs (EVAL_MODE=jobs; eval_watch submits one per complete checkpoint): $EVAL_JOB_SUBMIT TAG"
        else   # the watcher job reads its copy of the pipeline, so the line travels in it
            printf '\n# added by submit.sh: the sbatch line of the per-checkpoint eval jobs, less the tag\nEVAL_JOB_SUBMIT=%s\n' \
                "${EVAL_JOB_SUBMIT@Q}" >> "$job_pipeline"
        fi
    fi
    declare -A JOB
    local stage dep waits cmd id
    local previous=""
    for stage in "${STAGES[@]}"; do
        stage_flags "$stage"
        dep=() waits="nothing"
        case "$stage" in
            eval_watch)   # starts once training has started; cancelled with training if prep fails
                dep=(--dependency="after:${JOB[train]}${JOB[prep_finalize]:+,afterok:${JOB[prep_finalize]}}")
                waits="train to start${JOB[prep_finalize]:+, prep_finalize to succeed}" ;;
            *)
                if [ -n "$previous" ]; then
                    dep=(--dependency="afterok:${JOB[$previous]}")
                    waits="$previous to succeed"
                fi ;;
        esac
        local extra_env=()
        [ "$stage" != eval_watch ] || extra_env=(--export="ALL,TRAIN_JOB_ID=${JOB[train]}")
        cmd=(sbatch "${SITE_FLAGS[@]}" "${STAGE_FLAGS[@]}" "${dep[@]}" "${extra_env[@]}"
             "$SLURM_DIR/$stage.sbatch" "$job_pipeline")
        if [ "$DRY_RUN" = 1 ]; then
            JOB[$stage]="<$stage>"
            show_cmd "${cmd[@]}"
        else
            if ! id="$("${cmd[@]}")"; then
                [ "${#SUBMITTED[@]}" = 0 ] || scancel "${SUBMITTED[@]}" || true
                die "sbatch failed for $stage; cancelled the jobs already submitted (${SUBMITTED[*]:-none})"
            fi
            id="${id%%;*}"
            JOB[$stage]="$id"
            SUBMITTED+=("$id")
            echo "$stage: job $id (waits for $waits); log $LOG_DIR/$stage-$id.out"
            printf '%s %s\n' "$stage" "$id" >> "$LOG_DIR/jobs.txt"
        fi
        [ "$stage" = eval_watch ] || previous="$stage"
    done
    if [ "$DRY_RUN" = 0 ]; then
        echo "submitted ${#SUBMITTED[@]} jobs; follow with: squeue -j $(IFS=,; echo "${SUBMITTED[*]}")"
        echo "stage outcomes: $LOG_DIR/summary.txt; report when done: $RUN_DIR/eval/report.md"
    fi
}

show_config() {
    local mode="$MODE"
    [ "$DRY_RUN" = 0 ] || mode+=" (dry run)"
    printf '%-14s %s\n' "pipeline" "$PIPELINE_FILE" "mode" "$mode" "site" "${SITE:-none}" \
        "source" "$PREP_SOURCE${PREP_SOURCE:+ }$( [ "$PREP_SOURCE" = local ] && echo "${PREP_INPUT[*]}" || echo "$PREP_SAMPLE -> $RAW_DIR")" \
        "dataset" "$DATASET_DIR" "prep tasks" "$PREP_TASKS x $PREP_WORKERS worker(s)${FINALIZE_N:+, finalize $FINALIZE_N task(s)}" \
        "recipe" "$TRAIN_RECIPE" "train data" "${TRAIN_MIX_VALUE:-$DATASET_DIR}" \
        "overrides" "${TRAIN_SET_FLAGS[*]:$TRAIN_OVERRIDES_AT}" "run" "$RUN_DIR" "processes" "$NODES node(s) x $GPUS_PER_NODE" \
        "hellaswag" "$HELLASWAG${EVAL_LIMIT:+ (first $EVAL_LIMIT docs)}" \
        "eval mode" "$EVAL_MODE$( [ "$MODE" = local ] && [ "$EVAL_MODE" = jobs ] && echo " (scored in turn: --local submits no jobs)")" \
        "logs" "$LOG_DIR"
}

validate
plan_stages
show_config
echo "stages: ${STAGES[*]}"
if [ "$MODE" = local ]; then
    if [ "$DRY_RUN" = 1 ]; then
        for stage in "${STAGES[@]}"; do show_cmd bash "$SLURM_DIR/$stage.sbatch" "$PIPELINE_FILE"; done
    else
        run_local
    fi
else
    submit_chain
fi
