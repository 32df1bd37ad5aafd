"""The pipeline's orchestration: a pipeline file (slurm.config) -> stages (slurm.plan) -> one executor that runs
them here (--local) or submits them to Slurm (slurm.submit); each stage as a job runs it (slurm.stage); what the
controller says about a job (slurm.jobs). `slurm/submit.sh` and `slurm/stage.sbatch` are its shell entry points."""
