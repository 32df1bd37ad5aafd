"""`prep download`: a FineWeb / FineWeb-Edu sample's parquet files from the Hugging Face Hub into a raw directory.

The listing is taken at one commit (the --revision resolved once) and written to RAW/download.json, so every file
of a dataset comes from the same revision and tokenize can record it; later runs reuse that listing, so a rerun
over complete files needs no network. Each file is fetched into RAW/.partial/ with
HTTP range requests (a rerun continues where a killed one stopped), checked against the Hub's size and LFS sha256,
then renamed into place. A file already in place is re-hashed only if its size or mtime changed.

Nothing from the Hub is trusted to name a place: a listed path that would leave RAW (absolute, or with "..") is
refused before anything is written, and the token goes only to the configured Hub endpoint, never to the host a
redirect points to (the Hub redirects file downloads to a CDN with signed URLs, which need no token).
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import urllib.parse
import urllib.request
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


def origin(url: str) -> tuple[str, str, int | None]:
    u = urllib.parse.urlsplit(url)
    return u.scheme, (u.hostname or "").lower(), u.port or {"https": 443, "http": 80}.get(u.scheme)


class TokenOnlyToHub(urllib.request.HTTPRedirectHandler):
    """Follows redirects, dropping the Authorization header on any hop away from the Hub's own origin.

    urllib copies every header of a request onto its redirects, so without this a token would reach whatever
    host a redirect names.
    """

    def __init__(self, hub_url: str):
        super().__init__()
        self.hub = origin(hub_url)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and origin(new.full_url) != self.hub:
            new.remove_header("Authorization")
        return new


def fetch(url: str, dest: Path, size: int, sha256: str | None, token: str | None = None, hub: str | None = None,
          progress=None) -> None:
    """Download url to dest, resuming from dest's .partial file; verify size and sha256 before renaming into place.

    The token is sent only while the request stays on the origin of `hub` (the configured endpoint; default:
    url's own).
    """
    hub = hub or url
    part = dest.parent / ".partial" / (dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > size:  # not a prefix of this file: start over
        part.unlink()
        have = 0
    if have < size:
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"})
        if token and origin(url) == origin(hub):
            req.add_header("Authorization", f"Bearer {token}")
        opener = urllib.request.build_opener(TokenOnlyToHub(hub))
        with opener.open(req, timeout=60) as resp:
            if have and resp.status != 206:  # server ignored the range: rewrite from the start
                have = 0
            # Appended in place, not atomically: the partial file is the resume point, checked before its rename.
            with open(part, "ab" if have else "wb") as f:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    if progress:
                        progress(len(chunk))
                f.flush()
                os.fsync(f.fileno())
    got = part.stat().st_size
    if got != size:
        raise DownloadError(f"{dest.name}: got {got} bytes, the Hub lists {size}; rerun to resume")
    if sha256:
        actual = sha256_file(part)
        if actual != sha256:
            part.unlink()
            raise DownloadError(f"{dest.name}: sha256 {actual} != {sha256} listed by the Hub; deleted, rerun to fetch again")
    os.replace(part, dest)
    files.fsync_dir(dest.parent)


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
        from huggingface_hub import get_token, hf_hub_url
        token = get_token()
        with progress.bar(total=sum(f["bytes"] for f in todo), unit="B", unit_scale=True, desc="download") as bar:
            for f in todo:
                dest = out / f["path"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                url = hf_hub_url(repo_id, f["path"], repo_type="dataset", revision=commit, endpoint=endpoint)
                fetch(url, dest, f["bytes"], f["sha256"], token=token, hub=endpoint, progress=bar.update)
                file_status(dest, f["bytes"], f["sha256"])  # records the verified hash for the next run
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
