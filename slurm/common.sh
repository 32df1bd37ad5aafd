# Sourced by every slurm/*.sbatch script and by submit.sh: load the pipeline + site files, set up the
# environment, record each stage's outcome. Works the same under sbatch and under plain `bash`.
#
# Under sbatch, Slurm runs a copy of the script from its spool directory, so the repository is found through
# PIPELINE_REPO, which submit.sh exports (sbatch passes the submitting environment on by default).

PIPELINE_REPO="${PIPELINE_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export PIPELINE_REPO

die() {
    echo "error: $*" >&2
    exit 1
}

# ${x@Q} quoting (bash 4.4) carries paths with spaces into eval jobs' command lines; older bash (RHEL 7's 4.2)
# would fail mid-way with "bad substitution".
if (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4) )); then
    die "slurm/ scripts need bash 4.4 or newer; this is bash $BASH_VERSION"
fi

# job_field JOB FIELD: FIELD of JOB as the controller sees it now (e.g. JobState, Restarts), or nothing once
# the controller has forgotten the job or does not answer.
job_field() {
    scontrol show job -o "$1" 2>/dev/null | grep -o " $2=[^ ]*" | head -n 1 | cut -d= -f2 || true
}

# Paths in pipeline and site files are relative to the directory the pipeline is run from.
abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

# load_pipeline FILE: source the pipeline file, then the site file it names (if any), then fill in the
# single-node defaults every script relies on. Arrays (PREP_INPUT=(...), TRAIN_OVERRIDES=(...),
# SITE_SBATCH_EXTRA=(...)) survive because the files are sourced, not parsed.
load_pipeline() {
    local file="$1"
    [ -f "$file" ] || die "pipeline file not found: $file"
    PIPELINE_FILE="$(abspath "$file")"
    # shellcheck disable=SC1090
    source "$PIPELINE_FILE" || die "could not read pipeline file $PIPELINE_FILE"
    if [ -n "${SITE:-}" ]; then
        # A job starts hours after submit.sh read the site file: if it has gone since, the job must not run
        # without its partition, environment setup and network settings.
        SITE="$(abspath "$SITE")"
        [ -f "$SITE" ] || die "site file not found: $SITE (named by SITE= in $PIPELINE_FILE; copy slurm/site.env.example there and edit it)"
        # shellcheck disable=SC1090
        source "$SITE" || die "could not read site file $SITE"
    fi
    PREP_SOURCE="${PREP_SOURCE:-local}"
    PREP_SAMPLE="${PREP_SAMPLE:-10BT}"
    PREP_TASKS="${PREP_TASKS:-1}"
    PREP_WORKERS="${PREP_WORKERS:-1}"
    FINALIZE_TASKS="${FINALIZE_TASKS:-64}"   # at most this many finalize array tasks (submit.sh sizes the array)
    PREP_SHARD_TOKENS="${PREP_SHARD_TOKENS:-100000000}"
    PREP_VAL_TOKENS="${PREP_VAL_TOKENS:-10000000}"
    NODES="${NODES:-1}"
    GPUS_PER_NODE="${GPUS_PER_NODE:-1}"
    EVAL_LIMIT="${EVAL_LIMIT:-}"
    EVAL_POLL="${EVAL_POLL:-60}"
    EVAL_MODE="${EVAL_MODE:-jobs}"   # jobs: a short GPU job per checkpoint; watch: one GPU job beside training
    local key required=(DATASET_DIR TRAIN_RECIPE RUN_DIR HELLASWAG)
    [ "$PREP_SOURCE" = local ] || required+=(RAW_DIR)   # where a Hub source is downloaded to
    for key in "${required[@]}"; do
        [ -n "${!key:-}" ] || die "$PIPELINE_FILE does not set $key (needed with PREP_SOURCE=$PREP_SOURCE)"
    done
    for key in RAW_DIR DATASET_DIR TRAIN_RECIPE RUN_DIR HELLASWAG; do
        [ -z "${!key:-}" ] || printf -v "$key" '%s' "$(abspath "${!key}")"
    done
    LOG_DIR="$(abspath "${LOG_DIR:-$RUN_DIR/logs}")"
}

# The text inputs of the tokenize stage, as a bash array: the raw download dir, or PREP_INPUT.
tokenize_inputs() {
    TOKENIZE_INPUTS=()
    if [ "$PREP_SOURCE" = local ]; then
        local p
        for p in ${PREP_INPUT[@]+"${PREP_INPUT[@]}"}; do
            TOKENIZE_INPUTS+=("$(abspath "$p")")
        done
        [ "${#TOKENIZE_INPUTS[@]}" -gt 0 ] || die "PREP_SOURCE=local needs PREP_INPUT (files or directories)"
    else
        TOKENIZE_INPUTS=("$RAW_DIR")
    fi
}

# The dataset recipe, as flags that every tokenize invocation (array task, check, rerun) must share.
tokenize_flags() {
    TOKENIZE_FLAGS=(--shard-tokens "$PREP_SHARD_TOKENS" --val-tokens "$PREP_VAL_TOKENS")
}

# pipeline_list KEY: the pipeline list KEY (TRAIN_OVERRIDES, TRAIN_MIX) as PIPELINE_LIST; a bash array keeps
# items with spaces, a string splits on spaces.
pipeline_list() {
    PIPELINE_LIST=()
    if declare -p "$1" 2>/dev/null | grep -q '^declare -a'; then
        local -n list="$1"
        PIPELINE_LIST=(${list[@]+"${list[@]}"})
    else
        read -r -a PIPELINE_LIST <<< "${!1:-}"
    fi
}

# A weight as train reads it: decimal, no leading zeros (YAML takes 010 for octal 8), a non-zero digit.
is_mix_weight() {
    [[ "$1" =~ ^((0|[1-9][0-9]*)(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] && [[ "${1%%[eE]*}" == *[1-9]* ]]
}

# A YAML single-quoted scalar: nothing in it is special but the quote, which is doubled.
yaml_quote() {
    local q="'"
    printf '%s' "'${1//$q/$q$q}'"
}

# TRAIN_MIX (entries DIR=WEIGHT or DIR=WEIGHT=NAME, in order data.mix[0], [1], ...) as TRAIN_MIX_DIRS (absolute)
# and TRAIN_MIX_VALUE, the flow list train reads as data.mix; both empty without TRAIN_MIX. A DIR may hold '=':
# fields are taken from the right, and a last field that is not a number is the NAME.
train_mix() {
    pipeline_list TRAIN_MIX
    TRAIN_MIX_DIRS=() TRAIN_MIX_VALUE=""
    local entry dir weight name items=() i=0
    for entry in ${PIPELINE_LIST[@]+"${PIPELINE_LIST[@]}"}; do
        # A newline would end the one-line error and fold inside the quoted path.
        [[ "$entry" != *[[:cntrl:]]* ]] || die "TRAIN_MIX[$i] holds a control character: ${entry@Q}"
        name="" weight="${entry##*=}" dir="${entry%=*}"
        if [ "$dir" != "$entry" ] && ! is_mix_weight "$weight" && [[ "$dir" == *=* ]]; then
            name="$weight" weight="${dir##*=}" dir="${dir%=*}"
        fi
        if [ "$dir" = "$entry" ] || [ -z "$dir" ] || ! is_mix_weight "$weight"; then
            die "TRAIN_MIX[$i] '$entry' is not DIR=WEIGHT or DIR=WEIGHT=NAME with WEIGHT a positive number (0.7, 3)"
        fi
        dir="$(abspath "$dir")"
        TRAIN_MIX_DIRS+=("$dir")
        items+=("{dir: $(yaml_quote "$dir"), weight: $weight${name:+, name: $(yaml_quote "$name")}}")
        i=$((i + 1))
    done
    [ "$i" = 0 ] || TRAIN_MIX_VALUE="[$(IFS=,; echo "${items[*]}")]"
}

# The recipe's run_dir and data (DATASET_DIR, or the TRAIN_MIX mixture), then TRAIN_OVERRIDES, as `--set k=v`
# arguments; TRAIN_OVERRIDES_AT is the index where TRAIN_OVERRIDES begin.
train_set_flags() {
    train_mix
    TRAIN_SET_FLAGS=(--set "run_dir=$RUN_DIR")
    if [ -n "$TRAIN_MIX_VALUE" ]; then
        TRAIN_SET_FLAGS+=(--set data.dir=null --set "data.mix=$TRAIN_MIX_VALUE")
    else
        TRAIN_SET_FLAGS+=(--set "data.dir=$DATASET_DIR")
    fi
    TRAIN_OVERRIDES_AT=${#TRAIN_SET_FLAGS[@]}
    pipeline_list TRAIN_OVERRIDES
    local o
    for o in ${PIPELINE_LIST[@]+"${PIPELINE_LIST[@]}"}; do
        TRAIN_SET_FLAGS+=(--set "$o")
    done
}

# The environment the Python stages run in: the site's activation code, else the checkout's .venv.
setup_env() {
    if [ -n "${SITE_ENV_SETUP:-}" ]; then
        eval "$SITE_ENV_SETUP" || die "SITE_ENV_SETUP failed: $SITE_ENV_SETUP"
    fi
    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$PIPELINE_REPO/.venv/bin/python" ]; then
            PYTHON="$PIPELINE_REPO/.venv/bin/python"
        else
            PYTHON=python3
        fi
    fi
    # The stages are packages of the checkout; run them from it whatever the job's directory.
    export PYTHONPATH="$PIPELINE_REPO${PYTHONPATH:+:$PYTHONPATH}"
    if [ -n "${SITE_NET_IFNAME:-}" ]; then   # which interface gloo / NCCL use between nodes
        export GLOO_SOCKET_IFNAME="$SITE_NET_IFNAME" NCCL_SOCKET_IFNAME="$SITE_NET_IFNAME"
    fi
    if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d "$PIPELINE_REPO/../shared/tiktoken" ]; then
        export TIKTOKEN_CACHE_DIR="$PIPELINE_REPO/../shared/tiktoken"
    fi
}

# stage_begin NAME: from here on, the stage's end (ok or failed, with its exit status and log) is appended
# to LOG_DIR/summary.txt, the one place that says which stage failed and where to look.
stage_begin() {
    STAGE="$1"
    mkdir -p "$LOG_DIR"
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        local id="${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"
        STAGE_ID="${id:-$SLURM_JOB_ID}"
        STAGE_LOG="$LOG_DIR/$STAGE-$STAGE_ID.out"
    else
        STAGE_ID="local${TASK_INDEX:+-$TASK_INDEX}"
        STAGE_LOG="${STAGE_LOG:-(this terminal)}"
    fi
    echo "== $STAGE ($STAGE_ID) on $(hostname) at $(date -u +%FT%TZ)"
    trap 'stage_end $?' EXIT
}

stage_end() {
    local status="$1" outcome="${STAGE_OUTCOME:-ok}"   # a stage may name its own outcome (train: requeued)
    if [ "$status" -ne 0 ] && [ -z "${STAGE_OUTCOME:-}" ]; then
        outcome="FAILED (exit $status)"
        echo "error: stage $STAGE failed (exit $status); log: $STAGE_LOG" >&2
    fi
    printf '%s %s %s %s log: %s\n' "$(date -u +%FT%TZ)" "$STAGE" "$STAGE_ID" "$outcome" "$STAGE_LOG" \
        >> "$LOG_DIR/summary.txt"
}
