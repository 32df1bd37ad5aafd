"""slurm/demo_data.py: the demo's FineWeb-Edu documents streamed from the Hub with HTTP range requests.

The Hub is a local HTTP server here (HF_ENDPOINT, as for `prep download`): it answers the real resolve URL with a
redirect to a "CDN" path, as huggingface.co does, and serves a small real parquet file made by the test in
FineWeb's schema, with ranges. Everything else is the code path `make demo` runs on a machine with internet."""
import http.server
import importlib.util
import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, SHARED

spec = importlib.util.spec_from_file_location("demo_data", REPO / "slurm" / "demo_data.py")
demo_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_data)

ROWS_PER_GROUP = 100
RESOLVE_PATH = f"/datasets/{demo_data.FINEWEB_EDU}/resolve/main/{demo_data.FINEWEB_EDU_FILE}"  # the Hub's URL


class HubHandler(http.server.BaseHTTPRequestHandler):
    """The resolve URL redirects to /cdn/..., which serves `payload` with HEAD and single-range GET support."""
    payload = b""
    served = 0     # body bytes sent
    requests = []  # (method, path, Range header)

    def _cdn(self, head: bool):
        type(self).requests.append((self.command, self.path, self.headers.get("Range")))
        if self.path == RESOLVE_PATH:
            self.send_response(302)
            self.send_header("Location", "/cdn/000_00000.parquet")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not self.path.startswith("/cdn/"):
            self.send_error(404)
            return
        data, rng = self.payload, self.headers.get("Range")
        start, end = 0, len(data) - 1
        if rng:
            first, last = rng.split("=")[1].split("-")
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        body = data[start:end + 1]
        self.send_response(206 if rng else 200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if not head:
            self.wfile.write(body)
            type(self).served += len(body)

    def do_GET(self):
        self._cdn(head=False)

    def do_HEAD(self):
        self._cdn(head=True)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fineweb_parquet(tmp_path_factory):
    """Tiny Shakespeare's blocks as a parquet file in FineWeb-Edu's columns, in row groups of 100 documents."""
    blocks = [b.strip() for b in (SHARED / "data" / "tinyshakespeare.txt").read_text().split("\n\n") if b.strip()]
    n = len(blocks)
    table = pa.table({"text": blocks, "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
                      "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.org/{i}" for i in range(n)],
                      "score": [3.0] * n, "int_score": [3] * n})
    path = tmp_path_factory.mktemp("hub") / "000_00000.parquet"
    pq.write_table(table, path, row_group_size=ROWS_PER_GROUP)
    return path, blocks


@pytest.fixture
def hub(fineweb_parquet, monkeypatch):
    HubHandler.payload = fineweb_parquet[0].read_bytes()
    HubHandler.served, HubHandler.requests = 0, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield HubHandler
    server.shutdown()
    server.server_close()


def read_docs(out):
    return [json.loads(line) for p in sorted(out.glob("*.jsonl")) for line in p.read_text().splitlines()]


def test_fetches_the_first_documents_with_range_requests_and_caches_them(hub, fineweb_parquet, tmp_path, capsys,
                                                                          monkeypatch):
    _, blocks = fineweb_parquet
    monkeypatch.setattr(demo_data, "READ_BLOCK", 32 << 10)  # the read size to this 1 MB file's scale (2 GB on the Hub)
    out = tmp_path / "demo input"
    assert demo_data.main([str(out), "--docs", "250", "--files", "2"]) == 0
    docs = read_docs(out)
    assert [d["text"] for d in docs] == blocks[:250]
    assert docs[0]["id"] == "<urn:uuid:00000000>" and set(docs[0]) == {"id", "text"}
    assert sorted(p.name for p in out.iterdir()) == ["fineweb-edu-10BT_000.jsonl", "fineweb-edu-10BT_001.jsonl"]
    # Only part of the file crossed the wire: the footer and the first row groups' id and text columns.
    assert 0 < hub.served < len(hub.payload) / 2, (hub.served, len(hub.payload), hub.requests)
    assert all(r is not None for method, path, r in hub.requests if method == "GET" and path.startswith("/cdn/"))
    assert "the first 250 documents of http://127.0.0.1" in capsys.readouterr().out

    hub.requests = []
    assert demo_data.main([str(out), "--docs", "250", "--files", "2"]) == 0  # the next run: from the cache
    assert hub.requests == [] and "nothing to fetch" in capsys.readouterr().out


def test_a_missing_file_on_the_hub_is_one_line_naming_the_url(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo_data, "FINEWEB_EDU_FILE", "sample/10BT/999_00000.parquet")
    assert demo_data.main([str(tmp_path / "in")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: http://127.0.0.1") and "999_00000.parquet: not found on the Hub" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "in").exists()


def test_an_unreachable_hub_fails_fast_and_says_what_to_do_instead(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert demo_data.main([str(tmp_path / "in")]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the Hugging Face Hub at http://127.0.0.1:9" in err and "DEMO_TEXT=" in err


def test_a_text_file_becomes_documents_and_another_source_is_not_mixed_in(tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text("first block\n\nsecond block\n\n\nthird block\n")
    out = tmp_path / "in"
    assert demo_data.main([str(out), "--text", str(text), "--files", "2"]) == 0
    assert [d["text"] for d in read_docs(out)] == ["first block", "second block", "third block"]
    other = tmp_path / "other.txt"
    other.write_text("a\n\nb\n")
    assert demo_data.main([str(out), "--text", str(other), "--files", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out} already holds other documents (story_000.jsonl") and "\n" not in err
    assert not (out / "other_000.jsonl").exists()
