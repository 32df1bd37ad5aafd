#!/bin/bash
# The training job's step: `srun COMMAND` on every task of the allocation (one per GPU), run by the train stage
# (slurm/stage.py), which then decides on the requeue. The rendezvous (MASTER_ADDR / MASTER_PORT) is
# train/launch.py's, computed by each rank from Slurm's variables.
#   bash slurm/train_srun.sh python -m train --config ...
set -uo pipefail
# Slurm 22.05+ srun no longer inherits the job's --cpus-per-task: each task gets the CPUs the job asked for.
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# When Slurm ends the job it sends SIGTERM to this script as well as to the tasks, and bash would die at once,
# before the trainer has written its checkpoint. The trap keeps it waiting for srun (bash runs a trap only once
# its foreground command has returned).
term_received=0
trap 'term_received=1' TERM
status=0
# --wait: once one task exits, the others get this long to finish (a crashed rank would leave them hanging in a
# collective), but ranks that exit together after a checkpoint are never cut short.
[ "$term_received" = 1 ] || srun --wait=120 "$@" || status=$?
exit "$status"
