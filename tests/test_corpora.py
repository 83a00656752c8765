import hashlib
from pathlib import Path

import pytest

from corpora import registry
from model.data import CorpusError


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

        def read(self) -> bytes:
            return self.body

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
