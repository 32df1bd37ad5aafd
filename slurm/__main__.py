"""`python -m slurm submit PIPELINE.env [--dry-run|--local]` (what slurm/submit.sh runs) and
`python -m slurm STAGE PIPELINE.env [ARGS]` (what slurm/stage.sbatch runs: one stage, as a job or by hand)."""
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


def submit_command(argv: list[str]) -> int:
    from .submit import submit
    parser = cli.Parser(prog="slurm/submit.sh", description=(
        "Check a pipeline, then submit its stages to Slurm (download -> tokenize -> finalize -> train -> eval "
        "watch, chained with --dependency=afterok), or run them here in order (--local). Relative paths in the "
        "pipeline and site files are taken from the current directory (the repository root). docs/slurm.md"))
    parser.add_argument("pipeline", metavar="PIPELINE.env", help="configs/pipelines/NAME.env")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch lines (or stages), run nothing")
    parser.add_argument("--local", action="store_true", help="run the stages in order on this machine, no Slurm")

    def run(args) -> int:
        p = read_pipeline(args.pipeline)
        set_up_environment(p, ["submit", *argv])
        return submit(p, args.local, args.dry_run)
    parser.set_defaults(run=run)
    return cli.run(parser, argv)


def stage_command(argv: list[str]) -> int:
    parser = cli.Parser(prog="slurm/stage.sbatch", description="Run one stage of a pipeline (docs/slurm.md).")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("pipeline", metavar="PIPELINE.env")
    parser.add_argument("args", nargs="*", help="eval: the checkpoints (tags or tag directories) to score")

    def run(args) -> int:
        p = read_pipeline(args.pipeline)
        set_up_environment(p, argv)
        return run_stage(p, args.stage, args.args)
    parser.set_defaults(run=run)
    return cli.run(parser, argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["submit"]:
        return submit_command(argv[1:])
    return stage_command(argv)


if __name__ == "__main__":
    sys.exit(main())
