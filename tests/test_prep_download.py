"""prep download / eval-data: fast offline failure with a way forward, resumable verified fetches, local installs."""
import hashlib
import http.server
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from prep import UsageError
from prep.__main__ import main as prep_main
from prep.download import file_status, parse_files
from tests.conftest import PYTHON


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A handler that sends whole bodies and logs nothing."""

    def send_body(self, code: int, body: bytes, content_type: str | None = None):
        self.send_response(code)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_file_status_checks_size_and_sha_and_caches_the_hash(tmp_path):
    f = tmp_path / "a.parquet"
    f.write_bytes(b"parquet bytes")
    sha = hashlib.sha256(b"parquet bytes").hexdigest()
    assert file_status(tmp_path / "missing", 1, None) == "missing"
    assert file_status(f, 99, sha).startswith("size 13 != 99")
    assert file_status(f, 13, sha) == "ok" and (tmp_path / ".a.parquet.verified").exists()
    f.write_bytes(b"parquet byteZ")  # same size, new content and mtime: hashed again
    assert file_status(f, 13, sha).startswith("sha256 ")
    assert file_status(f, 13, None) == "ok"  # no hash listed: size is all that can be checked
    # A file written long before it was hashed is not hashed again while its size and mtime stay (shown here by
    # swapping the content behind the cache's back); one written just before is ("racily clean").
    f.write_bytes(b"parquet bytes")
    os.utime(f, ns=(time.time_ns() - 3600 * 10**9,) * 2)
    assert file_status(f, 13, sha) == "ok"
    mtime = f.stat().st_mtime_ns
    f.write_bytes(b"parquet byteZ")
    os.utime(f, ns=(mtime, mtime))
    assert file_status(f, 13, sha) == "ok"


def test_files_slice():
    assert list(parse_files("2:4", 10)) == [2, 3] and list(parse_files(None, 3)) == [0, 1, 2]
    assert list(parse_files("8:", 10)) == [8, 9]
    with pytest.raises(UsageError, match="expected I:J"):
        parse_files("a:b", 10)
    with pytest.raises(UsageError, match="selects none of the 10 files"):
        parse_files("12:14", 10)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_offline_fails_fast_and_says_how_to_bring_files(tmp_path, monkeypatch, capsys):
    args = ["download", "--dataset", "fineweb-edu", "--sample", "10BT", "--out", str(tmp_path / "raw")]
    start = time.monotonic()
    assert prep_main(args) == 1  # HF_HUB_OFFLINE=1 (set for every test)
    err = capsys.readouterr().err
    assert "error: HF_HUB_OFFLINE is set" in err
    assert "--include 'sample/10BT/*.parquet'" in err and "python -m prep tokenize --input" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert prep_main(args[:-4] + ["--dump", "CC-MAIN-2024-10", "--out", str(tmp_path / "raw")]) == 1
    err = capsys.readouterr().err
    assert "error: cannot reach the Hugging Face Hub" in err and "data/CC-MAIN-2024-10/*.parquet" in err
    assert time.monotonic() - start < 10 and not (tmp_path / "raw").exists()


def test_the_offline_advice_is_a_command_of_the_installed_huggingface_hub(tmp_path, capsys):
    """huggingface_hub >= 1.0 ships `hf`, not `huggingface-cli`: the command prep recommends must be there, with
    every flag it passes."""
    import re
    assert prep_main(["download", "--sample", "10BT", "--out", str(tmp_path / "raw")]) == 1
    command = re.search(r"`(hf [^`]+)`", capsys.readouterr().err).group(1).split()
    tool = Path(PYTHON).parent / command[0]
    assert tool.exists(), f"{command[0]} is not installed beside {PYTHON}"
    usage = subprocess.run([str(tool), *command[1:2], "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0, usage.stderr
    flags = [word for word in command if word.startswith("--")]
    assert flags == ["--repo-type", "--include", "--local-dir"] and all(f in usage.stdout for f in flags)


def test_eval_data_offline_error_and_local_install(tmp_path, shared_dir, capsys):
    assert prep_main(["eval-data", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error: HF_HUB_OFFLINE is set" in err and "--from FILE" in err
    src = shared_dir / "data" / "hellaswag_val.jsonl"
    assert prep_main(["eval-data", "--out", str(tmp_path / "eval"), "--from", str(src)]) == 0
    dest = tmp_path / "eval" / "hellaswag_val.jsonl"
    assert capsys.readouterr().out.strip() == str(dest)
    assert dest.read_bytes() == src.read_bytes()
    assert sum(1 for _ in dest.open()) == 10042


def test_eval_data_rejects_a_file_not_in_hellaswag_schema(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = {"activity_label": "a", "ctx_a": "b", "ctx_b": "", "ctx": "b", "endings": ["1", "2", "3", "4"], "label": 2}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "endings": ["only one"]}) + "\n")
    assert prep_main(["eval-data", "--out", str(tmp_path / "eval"), "--from", str(bad)]) == 1
    assert f"error: {bad}:2: 'endings' must be a list of 4 strings" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()  # nothing created, not even the directory


def test_rerun_over_complete_files_needs_no_network_and_catches_damage(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "sample" / "10BT").mkdir(parents=True)
    files = []
    for i in range(3):
        f = raw / "sample" / "10BT" / f"00{i}_00000.parquet"
        f.write_bytes(os.urandom(1000 + i))
        files.append({"path": f.relative_to(raw).as_posix(), "bytes": f.stat().st_size,
                      "sha256": hashlib.sha256(f.read_bytes()).hexdigest()})
    record = {"repo_id": "HuggingFaceFW/fineweb-edu", "dataset": "fineweb-edu", "sample": "10BT", "dump": None,
              "pattern": "sample/10BT/*.parquet", "revision": "0" * 40, "files": files}
    (raw / "download.json").write_text(json.dumps(record))
    args = ["download", "--dataset", "fineweb-edu", "--sample", "10BT", "--out", str(raw)]
    assert prep_main(args) == 0  # offline (HF_HUB_OFFLINE=1): the recorded listing and local hashes suffice
    assert "3 file(s) in place and verified (3 already were)" in capsys.readouterr().err
    damaged = raw / files[1]["path"]
    damaged.write_bytes(b"Z" + damaged.read_bytes()[1:])
    assert prep_main(args + ["--files", "1:2"]) == 1
    err = capsys.readouterr().err
    assert f"{damaged}: sha256" in err and "error: HF_HUB_OFFLINE is set" in err
    assert "1 file(s) still to fetch (first: sample/10BT/001_00000.parquet)" in err and not damaged.exists()
    assert prep_main(args[:-4] + ["--sample", "100BT", "--out", str(raw)]) == 1
    assert "refusing to mix in HuggingFaceFW/fineweb-edu sample/100BT/*.parquet" in capsys.readouterr().err
    assert prep_main(args + ["--revision", "v1.2.0"]) == 1
    assert "refusing to mix in --revision v1.2.0" in capsys.readouterr().err


def test_tokenize_records_the_download_source(tmp_path, shakespeare_docs, capsys):
    from prep.reader import Dataset
    from tests.fixtures_data import write_fineweb_parquet
    raw = tmp_path / "raw"
    (raw / "sample" / "10BT").mkdir(parents=True)
    f = write_fineweb_parquet(raw / "sample" / "10BT" / "000_00000.parquet", shakespeare_docs[:300], 100)
    files = [{"path": "sample/10BT/000_00000.parquet", "bytes": f.stat().st_size, "sha256": None},
             {"path": "sample/10BT/001_00000.parquet", "bytes": 5, "sha256": None}]
    (raw / "download.json").write_text(json.dumps({
        "repo_id": "HuggingFaceFW/fineweb-edu", "dataset": "fineweb-edu", "sample": "10BT", "dump": None,
        "pattern": "sample/10BT/*.parquet", "revision": "a" * 40, "files": files}))
    assert prep_main(["tokenize", "--input", str(raw), "--out", str(tmp_path / "ds"), "--val-tokens", "500"]) == 0
    assert "lists 2 files, the inputs hold 1 of them" in capsys.readouterr().err
    assert Dataset(tmp_path / "ds").manifest["source"] == {
        "kind": "huggingface", "repo_id": "HuggingFaceFW/fineweb-edu", "dataset": "fineweb-edu", "sample": "10BT",
        "dump": None, "revision": "a" * 40, "pattern": "sample/10BT/*.parquet", "files_listed": 2, "files_used": 1}


class FakeHub(QuietHandler):
    """The Hub's API and file endpoints for one dataset: the listing it is given, file downloads redirected to a
    second server (as the Hub redirects to its CDN), which honours Range requests. Records each request's method,
    path, Authorization and Range headers. cut: the CDN's first response stops after that many bytes (a transfer
    killed mid-way); served: the bytes the CDN sends instead of the payload (a corrupted copy)."""
    listing: list = []
    cdn = ""
    payload = b""
    served = None
    cut = None
    commit = "c" * 40
    seen: list = []

    def _record(self):
        type(self).seen.append((self.command, self.path, self.headers.get("Authorization"),
                                self.headers.get("Range")))

    def do_HEAD(self):
        self._record()
        if self.path.startswith(f"/datasets/HuggingFaceFW/fineweb-edu/resolve/{self.commit}/"):
            self.send_response(302)
            self.send_header("Location", f"{self.cdn}/signed/{self.path.rsplit('/', 1)[-1]}?sig=x")
            self.send_header("X-Repo-Commit", self.commit)
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(self.payload).hexdigest()}"')
            self.send_header("X-Linked-Size", str(len(self.payload)))
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def do_GET(self):
        self._record()
        if self.path.startswith("/api/datasets/HuggingFaceFW/fineweb-edu/revision/"):
            self._json({"id": "HuggingFaceFW/fineweb-edu", "sha": self.commit})
        elif self.path.startswith(f"/api/datasets/HuggingFaceFW/fineweb-edu/tree/{self.commit}/"):
            self._json([{"type": "file", "path": p, "size": len(self.payload), "oid": "0" * 40,
                         "lfs": {"oid": hashlib.sha256(self.payload).hexdigest(), "size": len(self.payload),
                                 "pointerSize": 134}} for p in self.listing])
        elif self.path.startswith("/signed/"):  # the CDN
            body = self.payload if self.served is None else self.served
            rng = self.headers.get("Range")
            start = int(rng.split("=")[1].split("-")[0]) if rng else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if type(self).cut is not None:  # the connection drops mid-file
                self.wfile.write(body[start:start + type(self).cut])
                type(self).cut = None
                self.close_connection = True
                return
            self.wfile.write(body[start:])
        else:
            self.send_error(404)

    def _json(self, obj):
        self.send_body(200, json.dumps(obj).encode(), "application/json")


@pytest.fixture
def fake_hub():
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    hub, cdn = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    FakeHub.cdn, FakeHub.payload, FakeHub.seen, FakeHub.served, FakeHub.cut = cdn, os.urandom(50_000), [], None, None
    yield hub, cdn
    for s in servers:
        s.shutdown()


def _download(hub, raw, tmp_path, *extra):
    from tests.conftest import REPO
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub, "HF_TOKEN": "hf_secret", "HF_HOME": str(tmp_path)}
    return subprocess.run([PYTHON, "-m", "prep", "download", "--dataset", "fineweb-edu", "--sample", "10BT",
                           "--out", str(raw), *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def cdn_requests():
    return [(auth, rng) for method, path, auth, rng in FakeHub.seen if path.startswith("/signed/")]


def test_download_sends_the_token_to_the_hub_only_never_to_a_redirect_target(tmp_path, fake_hub):
    hub, cdn = fake_hub
    FakeHub.listing = ["sample/10BT/000_00000.parquet"]
    raw = tmp_path / "raw"
    r = _download(hub, raw, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (raw / "sample/10BT/000_00000.parquet").read_bytes() == FakeHub.payload
    api = [(method, auth) for method, path, auth, _ in FakeHub.seen if "/fineweb-edu/" in path]
    assert cdn_requests() == [(None, None)]  # the CDN never sees the token
    # The listing (revision, tree) and huggingface_hub's HEAD of the file, each with the token.
    assert api == [("GET", "Bearer hf_secret"), ("GET", "Bearer hf_secret"), ("HEAD", "Bearer hf_secret")], api
    assert "download: 100%" in r.stderr  # the transfer shows a progress bar


def test_a_transfer_cut_off_mid_file_resumes_with_a_range_request(tmp_path, fake_hub):
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE  # what huggingface_hub writes at a time (10 MiB)
    hub, _ = fake_hub
    FakeHub.listing = ["sample/10BT/000_00000.parquet"]
    FakeHub.payload = os.urandom(DOWNLOAD_CHUNK_SIZE + (2 << 20))
    FakeHub.cut = DOWNLOAD_CHUNK_SIZE + (1 << 20)
    raw = tmp_path / "raw"
    r = _download(hub, raw, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (raw / "sample/10BT/000_00000.parquet").read_bytes() == FakeHub.payload
    # The second request asks only for what the first did not deliver (from the last whole chunk written).
    assert cdn_requests() == [(None, None), (None, f"bytes={DOWNLOAD_CHUNK_SIZE}-")]
    assert sorted(p.name for p in raw.iterdir()) == [".cache", "download.json", "sample"]


def test_a_file_whose_bytes_do_not_match_the_listed_sha256_is_deleted_and_refetched(tmp_path, fake_hub):
    hub, _ = fake_hub
    FakeHub.listing = ["sample/10BT/000_00000.parquet"]
    FakeHub.served = bytes(len(FakeHub.payload))  # the right size, the wrong bytes
    raw = tmp_path / "raw"
    r = _download(hub, raw, tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: 000_00000.parquet: sha256 ")
    assert "listed by the Hub; deleted, rerun to fetch again" in r.stderr
    assert not (raw / "sample/10BT/000_00000.parquet").exists()
    FakeHub.served = None
    assert _download(hub, raw, tmp_path).returncode == 0
    assert (raw / "sample/10BT/000_00000.parquet").read_bytes() == FakeHub.payload


def test_files_slice_fetches_its_share_of_the_pinned_listing(tmp_path, fake_hub):
    hub, _ = fake_hub
    FakeHub.listing = [f"sample/10BT/00{i}_00000.parquet" for i in range(4)]
    raw = tmp_path / "raw"
    r = _download(hub, raw, tmp_path, "--files", "1:3")
    assert r.returncode == 0, r.stderr
    record = json.loads((raw / "download.json").read_text())
    assert record["revision"] == FakeHub.commit and [f["path"] for f in record["files"]] == FakeHub.listing
    assert sorted(p.name for p in (raw / "sample/10BT").glob("*.parquet")) == ["001_00000.parquet", "002_00000.parquet"]
    assert len(cdn_requests()) == 2
    FakeHub.seen = []
    assert _download(hub, raw, tmp_path, "--files", "1:3").returncode == 0  # in place and verified: no transfer
    assert cdn_requests() == []


@pytest.mark.parametrize("bad", ["../escaped.parquet", "sample/../../escaped.parquet", "ABSOLUTE"])
def test_download_refuses_a_listing_path_that_leaves_out(tmp_path, fake_hub, bad):
    hub, _ = fake_hub
    bad = str(tmp_path / "absolute.parquet") if bad == "ABSOLUTE" else bad
    FakeHub.listing = ["sample/10BT/000_00000.parquet", bad]
    raw = tmp_path / "deep" / "raw"
    raw.mkdir(parents=True)
    victim = (raw / bad).resolve() if not bad.startswith("/") else Path(bad)
    r = _download(hub, raw, tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"file path {bad!r} is not a relative path inside {raw}" in r.stderr
    assert list(raw.iterdir()) == [] and not victim.exists()
    assert cdn_requests() == []
    # A download.json edited to hold such a path is refused the same way, offline, before any file is checked.
    record = {"repo_id": "HuggingFaceFW/fineweb-edu", "dataset": "fineweb-edu", "sample": "10BT", "dump": None,
              "pattern": "sample/10BT/*.parquet", "revision": FakeHub.commit,
              "files": [{"path": bad, "bytes": 5, "sha256": None}]}
    (raw / "download.json").write_text(json.dumps(record))
    assert prep_main(["download", "--dataset", "fineweb-edu", "--sample", "10BT", "--out", str(raw)]) == 1
