"""Crash-safe file writes: a temporary file in the same directory, fsync, os.replace, fsync the directory."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TMP_MARKER = ".tmp-"  # temporary names are ".<target>.tmp-<random>": hidden, and never a checkpoint's name


@contextmanager
def atomic_write(target: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file that replaces `target` only if the block completes.

    Either the old file or the complete new one is at `target` whatever happens, a crash
    or a full disk included; a failed write removes its temporary file.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}{TMP_MARKER}{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (fsync(2) on the directory itself)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
