import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from charrnn.corpora import registry
from charrnn.model.data import CorpusError


def test_manifest_lists_source_licence_and_checksum() -> None:
    entries = registry.manifest()
    shakespeare = entries["tinyshakespeare"]
    assert shakespeare.source.endswith("char-rnn/master/data/tinyshakespeare/input.txt")
    assert shakespeare.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert all(entry.licence for entry in entries.values())


def test_a_local_copy_is_used_only_if_its_checksum_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    entry = registry.CorpusEntry(
        "demo", "d", "http://127.0.0.1:9/none", "PD", hashlib.sha256(body).hexdigest(), None, ()
    )
    monkeypatch.setenv("CHARRNN_DATA_DIR", str(tmp_path / "data"))
    copy = tmp_path / "copy.txt"
    copy.write_bytes(body)
    monkeypatch.setenv("CHARRNN_DEMO", str(copy))
    assert registry.fetch(entry) == copy
    copy.write_bytes(body + b"tampered")
    with pytest.raises(CorpusError, match="could not download demo"):
        registry.fetch(entry)


def test_download_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Response:
        def __init__(self, body: bytes):
            self.body = body

        def read(self, size: int = -1) -> bytes:
            chunk, self.body = (self.body, b"") if size < 0 else (self.body[:size], self.body[size:])
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    good = b"good text\n"
    entry = registry.CorpusEntry(
        "demo", "d", "http://example.invalid/x", "PD", hashlib.sha256(good).hexdigest(), None, ()
    )
    monkeypatch.setenv("CHARRNN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(registry.urllib.request, "urlopen", lambda url, timeout: Response(b"evil text\n"))
    with pytest.raises(CorpusError, match="sha256"):
        registry.fetch(entry)
    assert not (tmp_path / "data" / "demo" / "input.txt").exists()
    monkeypatch.setattr(registry.urllib.request, "urlopen", lambda url, timeout: Response(good))
    assert registry.fetch(entry).read_bytes() == good


def test_python_stdlib_corpus_is_built_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARRNN_DATA_DIR", str(tmp_path))
    path, name = registry.resolve("python-stdlib")
    text = path.read_text(encoding="utf-8")
    assert name == "python-stdlib" and "def " in text and "# file: os.py" in text


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(CorpusError, match="tinyshakespeare"):
        registry.resolve("no-such-corpus-or-path")


class CorpusHandler(http.server.BaseHTTPRequestHandler):
    """Serves /ok (the expected text), /big (ten times more, with its length), /endless (no length, no end)."""

    body = b"a small corpus\n" * 100

    def do_GET(self) -> None:  # the name http.server calls
        self.send_response(200)
        if self.path == "/endless":
            self.end_headers()
            written = 0
            try:
                while written < 1 << 30:  # a client that reads it all would take a gigabyte
                    self.wfile.write(b"x" * 65536)
                    written += 65536
            except OSError:  # the client stopped reading and closed the connection
                pass
            return
        body = self.body * (10 if self.path == "/big" else 1)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def corpus_server() -> Iterator[str]:
    """A plain HTTP server on loopback, as a corpus host; its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CorpusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def served_entry(url: str) -> registry.CorpusEntry:
    body = CorpusHandler.body
    return registry.CorpusEntry("demo", "d", url, "PD", hashlib.sha256(body).hexdigest(), None, (), len(body))


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CHARRNN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CHARRNN_DEMO", raising=False)
    return tmp_path / "data"


def test_a_download_of_the_manifests_size_is_fetched(corpus_server: str, data_dir: Path) -> None:
    assert registry.fetch(served_entry(corpus_server + "/ok")).read_bytes() == CorpusHandler.body


def test_a_download_announced_larger_than_the_manifest_says_is_refused(corpus_server: str, data_dir: Path) -> None:
    with pytest.raises(CorpusError, match=f"announces {10 * len(CorpusHandler.body)} bytes"):
        registry.fetch(served_entry(corpus_server + "/big"))
    assert not (data_dir / "demo" / "input.txt").exists()


def test_an_endless_download_is_stopped_at_the_manifests_size(corpus_server: str, data_dir: Path) -> None:
    with pytest.raises(CorpusError, match=f"goes on past {len(CorpusHandler.body)} bytes"):
        registry.fetch(served_entry(corpus_server + "/endless"))  # reading it all would be a gigabyte
    assert not (data_dir / "demo" / "input.txt").exists()


def test_the_manifest_gives_each_download_its_size() -> None:
    entries = registry.manifest()
    assert entries["tinyshakespeare"].bytes == 1_115_394
    assert all(e.bytes is not None for e in entries.values() if e.source.startswith("http"))


def test_a_local_copy_of_the_wrong_size_is_not_even_hashed(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "copy.txt"
    copy.write_bytes(CorpusHandler.body + b"more")
    monkeypatch.setenv("CHARRNN_DEMO", str(copy))
    hashed: list[Path] = []
    monkeypatch.setattr(registry, "_sha256", lambda path: hashed.append(path) or "")
    with pytest.raises(CorpusError, match="not available locally"):
        registry.fetch(served_entry("http://127.0.0.1:9/none"), download=False)
    assert hashed == []
