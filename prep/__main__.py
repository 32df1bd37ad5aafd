"""`python -m prep {download,eval-data,tokenize,finalize,verify,info}`: FineWeb -> GPT-2 uint16 token shards."""
from __future__ import annotations

import os
import sys

from common import cli

from . import download, evaldata, finalize, tokenize, verify
from .workdir import check_task_flags


def _add_tokenize(sub) -> None:
    p = cli.add_command(sub, "tokenize", tokenize.tokenize,
                        help="tokenize parquet / jsonl / jsonl.zst / txt inputs into token shards")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", type=cli.existing_path,
                   help="files or directories (recursive)")
    p.add_argument("--out", required=True, help="dataset directory")
    p.add_argument("--workers", type=cli.positive_int, default=len(os.sched_getaffinity(0)),
                   help="processes on this node (default: the CPUs this process may use, e.g. Slurm's allocation)")
    p.add_argument("--shard-tokens", type=cli.positive_int, default=100_000_000, help="tokens per shard, e.g. 100M")
    p.add_argument("--val-tokens", type=cli.count, default=10_000_000, help="validation holdout size in tokens, e.g. 10M")
    p.add_argument("--val-seed", type=int, default=0, help="seed of the validation hash (default 0)")
    p.add_argument("--text-column", default="text", help="parquet column / JSON field holding the text")
    p.add_argument("--skip-bad-docs", action="store_true",
                   help="skip (and count) malformed JSON lines, records without text and parquet files without "
                        "the text column instead of stopping")
    p.add_argument("--task-index", type=cli.count, help="this Slurm array task (0-based); with --task-count: no finalize")
    p.add_argument("--task-count", type=cli.positive_int, help="number of array tasks sharing the input units")
    p.add_argument("--unit-bytes", type=cli.count, default=0,
                   help="pack parquet row groups into units of about this many uncompressed bytes, e.g. 64Mi "
                        "(0: about 1/2000 of the input, 1-256 MiB)")
    p.add_argument("--wait", action="store_true",
                   help="wait for another prep process working on --out to finish, instead of stopping")


def _add_finalize(sub) -> None:
    p = cli.add_command(sub, "finalize", _finalize, help="after all tokenize tasks: write the shards and manifest.json")
    p.add_argument("--out", required=True, type=cli.existing_path, help="dataset directory (tokenize's --out)")
    p.add_argument("--task-index", type=cli.count,
                   help="this Slurm array task (0-based): write only its share of the train shards; with --task-count")
    p.add_argument("--task-count", type=cli.positive_int,
                   help="number of array tasks sharing the shards; the last to finish writes manifest.json")
    p.add_argument("--verify", action="store_true",
                   help="the process that writes manifest.json then checks every shard as `prep verify` does")
    p.add_argument("--wait", action="store_true",
                   help="wait for another prep process working on --out to finish, instead of stopping")


def _finalize(args) -> int:
    check_task_flags(args.task_index, args.task_count)
    return finalize.finalize(args.out, args.wait, args.task_index, args.task_count, args.verify)


def _add_verify_info(sub) -> None:
    p = cli.add_command(sub, "verify", lambda a: verify.verify(a.dataset, a.workers),
                        help="re-check headers, sizes, token ranges and sha256 against the manifest")
    p.add_argument("dataset", type=cli.existing_path)
    p.add_argument("--workers", type=cli.positive_int, default=None,
                   help="processes checking whole shards (default: the CPUs this process may use, e.g. Slurm's "
                        "allocation, at most one per shard; 1: check in this process)")
    p = cli.add_command(sub, "info", lambda a: verify.info(a.dataset), help="print a dataset's summary")
    p.add_argument("dataset", type=cli.existing_path)


def _add_download(sub) -> None:
    p = cli.add_command(sub, "download", download.download,
                        help="download a FineWeb / FineWeb-Edu sample's parquet files (login node)")
    p.add_argument("--dataset", choices=sorted(download.DATASETS), default="fineweb-edu")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sample", choices=download.SAMPLES, help="sample folder, e.g. 10BT (default when no --dump)")
    g.add_argument("--dump", help="a named Common Crawl dump instead, e.g. CC-MAIN-2024-10")
    p.add_argument("--out", required=True, help="raw directory for the parquet files")
    p.add_argument("--files", help="only files I:J of the sorted listing (Python slice), to split the work")
    p.add_argument("--revision", default="main", help="branch, tag or commit (resolved to a commit and recorded)")


def _add_eval_data(sub) -> None:
    p = cli.add_command(sub, "eval-data", evaldata.eval_data,
                        help="HellaSwag validation as a local jsonl, for offline compute nodes")
    p.add_argument("--out", required=True, help="directory; writes hellaswag_val.jsonl there")
    p.add_argument("--from", dest="from_file", type=cli.existing_path, help="install this local jsonl copy instead of downloading")


def main(argv=None) -> int:
    return cli.main_with_commands("python -m prep", __doc__,
                                  (_add_download, _add_eval_data, _add_tokenize, _add_finalize, _add_verify_info), argv)


if __name__ == "__main__":
    sys.exit(main())
