#!/bin/bash
# Submit a whole pipeline to Slurm, or run it here (the code: slurm/submit.py; docs/slurm.md):
#   slurm/submit.sh PIPELINE.env             submit to Slurm (site settings: the SITE file the pipeline names)
#   slurm/submit.sh PIPELINE.env --dry-run   print the sbatch lines, submit nothing
#   slurm/submit.sh PIPELINE.env --local     run the same stages in order on this machine, no Slurm
exec bash "$(dirname "${BASH_SOURCE[0]}")/stage.sbatch" submit "$@"
