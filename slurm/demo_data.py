"""The demo's (and the tests') documents: a text file split into jsonl documents, or FineWeb-Edu from the Hub.

`prep tokenize` reads a .txt file as one document; the demo wants many (a validation split of whole documents) in
several files (several tokenize array tasks). With --text, each blank-line-separated block of the file becomes a
document; `make demo` passes --text ../shared/data/tinyshakespeare.txt where ../shared is beside the checkout
(tests, CI, offline machines). Without --text, the first few thousand documents of one FineWeb-Edu sample
parquet file are read over HTTP range requests (pyarrow over fsspec): the parquet footer, then the `id` and `text`
columns of the first row groups, a few MB instead of the file's 2 GB. Either way the documents land in OUT as
NAME_000.jsonl ... (one tokenize unit, so one array task, per file), written atomically; a rerun finds them and
fetches nothing. HF_ENDPOINT moves the Hub (a mirror; the tests' local server), as for `prep download`.

    python slurm/demo_data.py demo/input --files 2 --text ../shared/data/tinyshakespeare.txt
    python slurm/demo_data.py demo/input --files 2 --docs 2000
"""
import json
import sys
import time
from pathlib import Path

from common import cli, files
from common.errors import PipelineError

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
# One file of the 10BT sample (about 2 GB, ~700k documents); only its first row groups are read.
FINEWEB_EDU_FILE = "sample/10BT/000_00000.parquet"
FINEWEB_NAME = "fineweb-edu-10BT"
READ_BLOCK = 1 << 20  # bytes per range request: small reads, so the fetch stops soon after the last document


class DemoDataError(PipelineError):
    pass


def output_paths(out_dir: Path, name: str, n_files: int) -> list[Path]:
    return [out_dir / f"{name}_{i:03d}.jsonl" for i in range(n_files)]


def check_one_source(out_dir: Path, wanted: list[Path]) -> None:
    """Refuse to add a second source beside documents of another one: tokenize would read both."""
    others = sorted(p.name for p in out_dir.glob("*.jsonl") if p not in wanted) if out_dir.is_dir() else []
    if others:
        raise DemoDataError(f"{out_dir} already holds other documents ({', '.join(others[:3])}"
                            f"{', ...' if len(others) > 3 else ''}); remove {out_dir} (and the demo's dataset and "
                            f"run, e.g. `make clean-demo`) to switch sources")


def write_documents(paths: list[Path], docs: list[dict]) -> None:
    """Spread docs over paths in order, each file written atomically."""
    per_file = -(-len(docs) // len(paths))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        with files.atomic_file(path, "w") as f:
            for doc in docs[i * per_file:(i + 1) * per_file]:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")


def text_documents(text_path: Path) -> list[dict]:
    """Blank-line-separated blocks of a UTF-8 text file, each a document."""
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DemoDataError(f"{text_path}: not UTF-8 text (byte {exc.start})") from None
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    return [{"id": f"{text_path.stem}-{j}", "text": block} for j, block in enumerate(blocks)]


def fineweb_url(endpoint: str) -> str:
    from huggingface_hub import hf_hub_url
    return hf_hub_url(FINEWEB_EDU, FINEWEB_EDU_FILE, repo_type="dataset", revision="main", endpoint=endpoint)


def fineweb_documents(n_docs: int, endpoint: str) -> tuple[list[dict], dict]:
    """The first n_docs documents of FINEWEB_EDU_FILE, read with range requests; (docs, what was read)."""
    import fsspec
    import pyarrow.parquet as pq
    url = fineweb_url(endpoint)
    docs, row_groups = [], set()
    try:
        with fsspec.open(url, "rb", block_size=READ_BLOCK) as f:
            parquet = pq.ParquetFile(f, buffer_size=READ_BLOCK)  # buffered: pages are read as they are decoded
            missing = {"id", "text"} - set(parquet.schema_arrow.names)
            if missing:
                raise DemoDataError(f"{url}: no {', '.join(sorted(missing))} column (columns: "
                                    f"{', '.join(parquet.schema_arrow.names)})")
            for group in range(parquet.num_row_groups):
                for batch in parquet.iter_batches(batch_size=256, row_groups=[group], columns=["id", "text"]):
                    row_groups.add(group)
                    docs += [d for d in batch.to_pylist() if d["text"]][:n_docs - len(docs)]
                    if len(docs) == n_docs:
                        break
                if len(docs) == n_docs:
                    break
            size = parquet.metadata.serialized_size
    except FileNotFoundError:
        raise DemoDataError(f"{url}: not found on the Hub (moved? pick another file of the sample in "
                            "slurm/demo_data.py, or run `make demo DEMO_TEXT=any.txt`)") from None
    except (OSError, ValueError) as exc:  # fsspec / aiohttp raise these for HTTP errors; pyarrow for bad files
        if isinstance(exc, DemoDataError):
            raise
        raise DemoDataError(f"reading {url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                            " (no internet? run `make demo DEMO_TEXT=any.txt` instead)") from None
    if len(docs) < n_docs:
        raise DemoDataError(f"{url} holds only {len(docs)} documents with text, fewer than --docs {n_docs}")
    return docs, {"url": url, "row_groups": len(row_groups), "footer_bytes": size}


def prepare(args) -> int:
    out = args.out
    name = args.text.stem if args.text else FINEWEB_NAME
    paths = output_paths(out, name, args.files)
    check_one_source(out, paths)
    if all(p.exists() for p in paths):
        print(f"demo documents: {out} already holds {name} ({len(paths)} files); nothing to fetch")
        return 0
    start = time.monotonic()
    if args.text:
        docs = text_documents(args.text)
        source = f"{args.text}"
    else:
        from prep.download import check_online
        endpoint = check_online("run `make demo DEMO_TEXT=any.txt` with any UTF-8 text instead")
        docs, read = fineweb_documents(args.docs, endpoint)
        source = (f"the first {len(docs)} documents of {read['url']} (parquet footer and {read['row_groups']} "
                  f"row group(s) read over HTTP ranges)")
    if len(docs) < args.files:
        raise DemoDataError(f"{source} has {len(docs)} documents, fewer than --files {args.files}")
    write_documents(paths, docs)
    print(f"demo documents: {len(docs)} from {source} in {time.monotonic() - start:.1f} s -> "
          f"{', '.join(str(p) for p in paths)}")
    return 0


def main(argv=None) -> int:
    p = cli.Parser(prog="slurm/demo_data.py", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory for the NAME_000.jsonl ... files (e.g. demo/input)")
    p.add_argument("--text", type=cli.existing_path, help="split this UTF-8 text into documents instead of fetching FineWeb-Edu")
    p.add_argument("--docs", type=cli.positive_int, default=2000,
                   help="FineWeb-Edu documents to fetch (default 2000, about 2M tokens)")
    p.add_argument("--files", type=cli.positive_int, default=2, help="number of output files (default 2)")
    p.set_defaults(run=prepare)
    return cli.run(p, argv)


if __name__ == "__main__":
    sys.exit(main())
