"""Resolve a corpus name or path to a local file: verified download, local copy, or a local build.

`tinyshakespeare` is taken from a local copy when one is found (CHARRNN_TINYSHAKESPEARE, the data
directory, or a path listed in the manifest) and otherwise downloaded from its canonical char-rnn
address; either way its sha256 must match the manifest. `python-stdlib` is built from the running
interpreter's own sources.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charrnn.model.atomic import atomic_write
from charrnn.model.data import CorpusError, default_cache_dir

log = logging.getLogger(__name__)

MANIFEST_PATH = Path(__file__).with_name("manifest.json")
# A download of a corpus whose manifest entry gives no size is refused past this many bytes.
MAX_DOWNLOAD_BYTES = 256 << 20
CHUNK_BYTES = 1 << 16
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class CorpusEntry:
    """One manifest entry."""

    name: str
    description: str
    source: str
    licence: str
    sha256: str | None
    chars: int | None
    local_paths: tuple[str, ...]
    bytes: int | None = None  # the file's size: a download is refused as soon as it goes past it


def manifest() -> dict[str, CorpusEntry]:
    """Every named corpus, by name."""
    data: dict[str, dict[str, Any]] = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    return {
        name: CorpusEntry(name=name, **{**entry, "local_paths": tuple(entry["local_paths"])})
        for name, entry in data.items()
    }


def data_dir() -> Path:
    """Where fetched and built corpora live: $CHARRNN_DATA_DIR, else <cache>/corpora."""
    env = os.environ.get("CHARRNN_DATA_DIR")
    return Path(env) if env else default_cache_dir() / "corpora"


def resolve(name_or_path: str, download: bool = True) -> tuple[Path, str]:
    """(local path, corpus name) for a manifest name or a filesystem path."""
    entries = manifest()
    if name_or_path in entries:
        return fetch(entries[name_or_path], download=download), name_or_path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(sorted(entries))
        raise CorpusError(f"corpus not found: {name_or_path!r} is not a file, a directory or a name ({known})")
    return path, path.stem if path.is_file() else path.resolve().name


def fetch(entry: CorpusEntry, download: bool = True) -> Path:
    """Make the corpus available locally and return its path."""
    if entry.source == "builtin:python-stdlib":
        return build_python_stdlib()
    target = data_dir() / entry.name / "input.txt"
    candidates = [os.environ.get(f"CHARRNN_{entry.name.upper()}", ""), str(target)]
    candidates += [str(PROJECT_ROOT / p) for p in entry.local_paths] + list(entry.local_paths)
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if not path.is_file():
            continue
        if entry.bytes is not None and path.stat().st_size != entry.bytes:  # not worth hashing
            log.warning("%s: %d bytes, the manifest says %d; ignoring it", path, path.stat().st_size, entry.bytes)
        elif _sha256(path) == entry.sha256:
            return path
        else:
            log.warning("%s: sha256 does not match the manifest's; ignoring it", path)
    if not download:
        raise CorpusError(f"{entry.name} is not available locally; run `charrnn corpus fetch {entry.name}`")
    return _download(entry, target)


def _download(entry: CorpusEntry, target: Path) -> Path:
    """Download, verify (size, then sha256) and store the corpus; CorpusError if any step fails."""
    log.info("downloading %s from %s", entry.name, entry.source)
    try:
        with urllib.request.urlopen(entry.source, timeout=60) as response:
            body = _read_at_most(entry, response)
    except OSError as exc:
        raise CorpusError(
            f"could not download {entry.name} from {entry.source} ({exc}); "
            f"put a copy at {target} or set CHARRNN_{entry.name.upper()} to its path"
        ) from None
    if entry.bytes is not None and len(body) != entry.bytes:
        raise CorpusError(f"{entry.name}: downloaded {len(body)} bytes, expected {entry.bytes}; not used")
    digest = hashlib.sha256(body).hexdigest()
    if digest != entry.sha256:
        raise CorpusError(f"{entry.name}: downloaded file has sha256 {digest}, expected {entry.sha256}; not used")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as fh:
        fh.write(body)
    return target


def _read_at_most(entry: CorpusEntry, response: Any) -> bytes:
    """The response's body, read no further than the manifest's size (a byte more proves it too big)."""
    limit = entry.bytes if entry.bytes is not None else MAX_DOWNLOAD_BYTES
    declared = _content_length(response)
    if declared is not None and declared > limit:
        raise CorpusError(f"{entry.name}: the server announces {declared} bytes, more than {limit}; not downloaded")
    body = bytearray()
    while len(body) <= limit:
        chunk = response.read(min(CHUNK_BYTES, limit + 1 - len(body)))
        if not chunk:
            return bytes(body)
        body += chunk
    raise CorpusError(f"{entry.name}: the download goes on past {limit} bytes; stopped and not used")


def _content_length(response: Any) -> int | None:
    """The Content-Length the server sent, if any and readable."""
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def build_python_stdlib() -> Path:
    """Concatenate this interpreter's standard-library sources (tests excluded) into one text file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in stdlib.rglob("*.py")
        if not {"test", "tests", "site-packages", "idlelib"}.intersection(p.relative_to(stdlib).parts)
    )
    target = data_dir() / "python-stdlib" / "input.txt"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as fh:
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            fh.write(f"# file: {file.relative_to(stdlib)}\n{text}\n".encode())
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
