"""`python -m slurm submit PIPELINE.env [--dry-run|--local]` (what slurm/submit.sh runs) and
`python -m slurm STAGE PIPELINE.env [CHECKPOINT ...]` (what slurm/stage.sbatch runs: one stage, as a job or by
hand)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from common import cli

from .config import Pipeline, read_pipeline
from .plan import STAGE_SCRIPT
from .stage import STAGES, run_stage

REPO = Path(__file__).resolve().parent.parent
SETUP_MARK = "PIPELINE_ENV_SETUP_PID"


def set_up_environment(p: Pipeline, argv: list[str]) -> None:
    """The environment the stages run in: the site's SITE_ENV_SETUP first (shell code: modules, a virtual
    environment), so this process execs itself once through bash and the setup's own interpreter choice
    (slurm/stage.sbatch); then the checkout on PYTHONPATH, the network interface, the tokenizer cache."""
    setup = p.site.SITE_ENV_SETUP
    if setup and os.environ.get(SETUP_MARK) != str(os.getpid()):
        os.environ[SETUP_MARK] = str(os.getpid())   # exec keeps the pid: a job started from here runs it again
        script = 'eval "$1" || { echo "error: SITE_ENV_SETUP failed: $1" >&2; exit 1; }; shift; exec bash "$@"'
        sys.stdout.flush()
        os.execvp("bash", ["bash", "-c", script, "bash", setup, str(STAGE_SCRIPT), *argv])
    env = os.environ
    env["PIPELINE_REPO"] = str(REPO)   # a job's copy of stage.sbatch runs from Slurm's spool: it finds us here
    if str(REPO) not in env.get("PYTHONPATH", "").split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if p.site.SITE_NET_IFNAME:   # which interface gloo / NCCL use between nodes
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = p.site.SITE_NET_IFNAME
    shared_cache = REPO.parent / "shared" / "tiktoken"
    if not env.get("TIKTOKEN_CACHE_DIR") and shared_cache.is_dir():
        env["TIKTOKEN_CACHE_DIR"] = str(shared_cache)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Named as the user called it: argparse says an unknown flag in the top parser's name.
    parser = cli.Parser(prog="slurm/submit.sh" if argv[:1] == ["submit"] else "slurm/stage.sbatch",
                        description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = cli.add_command(sub, "submit", _submit, prog="slurm/submit.sh", help="check a pipeline, then run its stages",
                        description=(
        "Check a pipeline, then submit its stages to Slurm (download -> tokenize -> finalize -> train -> eval "
        "watch, chained with --dependency=afterok), or run them here in order (--local). Relative paths in the "
        "pipeline and site files are taken from the current directory (the repository root). docs/slurm.md"))
    p.add_argument("pipeline", metavar="PIPELINE.env", help="configs/pipelines/NAME.env")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch lines (or stages), run nothing")
    p.add_argument("--local", action="store_true", help="run the stages in order on this machine, no Slurm")
    for stage in STAGES:
        p = cli.add_command(sub, stage, _stage, prog=f"slurm/stage.sbatch {stage}", help=f"run the {stage} stage")
        p.add_argument("pipeline", metavar="PIPELINE.env")
        if stage == "eval":
            p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                           help="tags or tag directories to score (none: every complete one not yet scored)")
    parser.set_defaults(argv=argv)
    return cli.run(parser, argv)


def _submit(args) -> int:
    from .submit import submit
    p = read_pipeline(args.pipeline)
    set_up_environment(p, args.argv)
    return submit(p, args.local, args.dry_run)


def _stage(args) -> int:
    p = read_pipeline(args.pipeline)
    set_up_environment(p, args.argv)
    return run_stage(p, args.command, getattr(args, "checkpoints", []))


if __name__ == "__main__":
    sys.exit(main())
