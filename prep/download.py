"""`prep download`: a FineWeb / FineWeb-Edu sample's parquet files from the Hugging Face Hub into a raw directory.

The listing is taken at one commit (the --revision resolved once) and written to RAW/download.json, so every file
of a dataset comes from the same revision and tokenize can record it; later runs reuse that listing, so a rerun
over complete files needs no network. The transfer is huggingface_hub's hf_hub_download into RAW at that commit,
DOWNLOAD_THREADS files at a time: it resumes a killed transfer from RAW/.cache/huggingface/, checks the size, sends
the token only to the Hub (never to the CDN its redirects name) and uses the Xet backend where it is installed.
Each file is then checked against the listing's size and LFS sha256; a file already in place is re-hashed only if
its size or mtime changed.

Nothing from the Hub is trusted to name a place: a listed path that would leave RAW (absolute, or with "..") is
refused before anything is written.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from common import files, progress
from common.errors import PipelineError

from . import UsageError
from .workdir import load_json

DATASETS = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
SAMPLES = ("10BT", "100BT", "350BT")
RECORD = "download.json"
CHUNK = 8 << 20
CONNECT_TIMEOUT_S = 10
DOWNLOAD_THREADS = 8  # files transferred at once (huggingface_hub's own default for a snapshot)


class DownloadError(PipelineError):
    pass


def offline_help(repo_id: str, folder: str, out: Path) -> str:
    return (f"to work offline, fetch the files on a machine with internet, e.g. `hf download {repo_id} "
            f"--repo-type dataset --include '{folder}/*.parquet' --local-dir RAW`, copy them into {out} "
            f"(any layout), then run `python -m prep tokenize --input {out} --out DATASET`")


def check_online(help_text: str) -> str:
    """The Hub endpoint, after making sure it is reachable (fail in seconds, not after long retries)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise DownloadError(f"HF_HUB_OFFLINE is set, so the Hub cannot be reached; {help_text}")
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise DownloadError(f"cannot reach the Hugging Face Hub at {endpoint} ({exc.strerror or exc}); "
                            f"{help_text}") from None
    return endpoint


def parse_files(spec: str | None, n: int) -> range:
    if not spec:
        return range(n)
    try:
        i, j = (int(x) if x else None for x in spec.split(":"))
    except ValueError:
        raise UsageError(f"--files {spec!r}: expected I:J (a Python slice of the sorted file list)") from None
    picked = range(n)[slice(i, j)]
    if not picked:
        raise UsageError(f"--files {spec} selects none of the {n} files")
    return picked


def list_files(repo_id: str, folder: str, revision: str, endpoint: str) -> tuple[str, list[dict]]:
    """(commit sha, [{path, bytes, sha256}]) of the parquet files under `folder` at `revision`."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    api = HfApi(endpoint=endpoint)
    commit = api.dataset_info(repo_id, revision=revision, timeout=CONNECT_TIMEOUT_S).sha
    found = [{"path": f.path, "bytes": f.size, "sha256": f.lfs.sha256 if f.lfs else None}
             for f in api.list_repo_tree(repo_id, folder, recursive=True, repo_type="dataset", revision=commit)
             if isinstance(f, RepoFile) and f.path.endswith(".parquet")]
    if not found:
        raise DownloadError(f"{repo_id}@{commit[:12]} has no parquet files under {folder}/")
    return commit, sorted(found, key=lambda f: f["path"])


def check_listing(listed: list[dict], out: Path, source: str) -> None:
    """Refuse a listing with any path that would not stay inside `out` (nothing is touched before this)."""
    for f in listed:
        rel = f.get("path")
        parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel or "\0" in rel:
            raise DownloadError(f"{source}: file path {rel!r} is not a relative path inside {out} (absolute, or "
                                f"with '..'); refusing the whole listing (nothing was downloaded or deleted)")


def file_status(path: Path, size: int, sha256: str | None) -> str:
    """'ok', 'missing' or a reason the local file is wrong. A verified hash is cached beside the raw dir."""
    if not path.exists():
        return "missing"
    st = path.stat()
    if st.st_size != size:
        return f"size {st.st_size} != {size}"
    if not sha256:
        return "ok"
    stamp = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    cache = path.with_name(f".{path.name}.verified")
    if cache.exists():
        cached = load_json(cache, "hash cache")
        # Trust it only if the file was last written well before it was hashed: file timestamps are coarse, so a
        # change made within the same tick as the hash would keep size and mtime (git's "racily clean" rule).
        if {k: cached.get(k) for k in stamp} == stamp and cached.get("verified_at_ns", 0) - st.st_mtime_ns > 2e9:
            return "ok"
    actual = sha256_file(path)
    if actual != sha256:
        return f"sha256 {actual[:12]}... != {sha256[:12]}..."
    files.write_json(cache, {**stamp, "verified_at_ns": time.time_ns()})
    return "ok"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(repo_id: str, f: dict, out: Path, commit: str, endpoint: str) -> None:
    """One listed file into out/PATH with hf_hub_download (resumed, size-checked, token kept on the Hub), then its
    size and sha256 checked against the listing; a file that does not match is deleted."""
    from huggingface_hub import hf_hub_download
    dest = out / f["path"]
    try:
        hf_hub_download(repo_id, f["path"], repo_type="dataset", revision=commit,
                        local_dir=out, endpoint=endpoint)
    except Exception as exc:  # huggingface_hub raises HTTP, consistency and OS errors of many kinds
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DownloadError(f"{dest.name}: {type(exc).__name__}: {first}; rerun to resume") from None
    status = file_status(dest, f["bytes"], f["sha256"])  # records the verified hash for the next run
    if status != "ok":
        dest.unlink(missing_ok=True)
        raise DownloadError(f"{dest.name}: {status} listed by the Hub; deleted, rerun to fetch again")


def download(args) -> int:
    """List (or reuse the recorded listing), then fetch what is missing or wrong; offline is fine if nothing is."""
    repo_id = DATASETS[args.dataset]
    folder = f"data/{args.dump}" if args.dump else f"sample/{args.sample or '10BT'}"
    out = Path(args.out).resolve()
    help_text = offline_help(repo_id, folder, out)
    record = _recorded_listing(out, repo_id, folder, args.revision)
    endpoint = None
    if record is None:
        endpoint = check_online(help_text)
        record = _list_and_record(out, args, repo_id, folder, endpoint)
    commit, listed = record["revision"], record["files"]
    picked = [listed[i] for i in parse_files(args.files, len(listed))]
    print(f"{repo_id} {folder}/ at {commit}: {len(listed)} files, taking {len(picked)} "
          f"({sum(f['bytes'] for f in picked) / 1e9:,.2f} GB) into {out}", file=sys.stderr)
    todo = []
    for f in progress.bar(iterable=picked, desc="verify local", unit="file"):
        status = file_status(out / f["path"], f["bytes"], f["sha256"])
        if status != "ok":
            todo.append(f)
            if status != "missing":
                print(f"{out / f['path']}: {status}; fetching again", file=sys.stderr)
                (out / f["path"]).unlink()
    if todo:
        endpoint = endpoint or check_online(f"{len(todo)} file(s) still to fetch (first: {todo[0]['path']}); "
                                            + help_text)
        # One bar over the files here, one per file transfer from huggingface_hub.
        with progress.bar(total=len(todo), desc="download", unit="file") as bar, \
                ThreadPoolExecutor(min(DOWNLOAD_THREADS, len(todo))) as pool:
            futures = [pool.submit(fetch, repo_id, f, out, commit, endpoint) for f in todo]
            try:
                for future in futures:  # in listing order: the first failure in order is the one reported
                    future.result()
                    bar.update(1)
            finally:
                for future in futures:
                    future.cancel()
    print(f"done: {len(picked)} file(s) in place and verified ({len(picked) - len(todo)} already were) in {out}",
          file=sys.stderr)
    return 0


def _recorded_listing(out: Path, repo_id: str, folder: str, revision: str) -> dict | None:
    """RAW/download.json from an earlier run, if it is for this dataset (a different one is refused)."""
    if not (out / RECORD).exists():
        return None
    rec = load_json(out / RECORD, "download record")
    check_listing(rec.get("files", []), out, str(out / RECORD))
    pattern = f"{folder}/*.parquet"
    if (rec.get("repo_id"), rec.get("pattern")) != (repo_id, pattern):
        raise DownloadError(f"{out} already holds {rec.get('repo_id')} {rec.get('pattern')}; refusing to mix in "
                            f"{repo_id} {pattern} (use another --out)")
    if revision not in ("main", rec["revision"]):
        raise DownloadError(f"{out} holds revision {rec['revision']}; refusing to mix in --revision {revision} "
                            f"(use another --out)")
    return rec


def _list_and_record(out: Path, args, repo_id: str, folder: str, endpoint: str) -> dict:
    try:
        commit, listed = list_files(repo_id, folder, args.revision, endpoint)
    except DownloadError:
        raise
    except Exception as exc:  # huggingface_hub raises HTTP / repository errors of several kinds
        raise DownloadError(f"listing {repo_id} {folder}/ at {args.revision}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    check_listing(listed, out, f"the Hub's listing of {repo_id}@{commit[:12]} {folder}/")
    out.mkdir(parents=True, exist_ok=True)
    record = {"repo_id": repo_id, "dataset": args.dataset, "sample": None if args.dump else (args.sample or "10BT"),
              "dump": args.dump, "pattern": f"{folder}/*.parquet", "revision": commit, "files": listed}
    files.write_json(out / RECORD, record)
    return record
