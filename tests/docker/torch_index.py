"""Serve the torch wheels of a directory as a pip index (PEP 503) on loopback, for `docker build` on a
machine that cannot reach PyTorch's own index:

    python3 tests/docker/torch_index.py WHEEL_DIR PORT     # then TORCH_INDEX_URL=http://127.0.0.1:PORT/simple

Only `torch` is listed; pip finds every other package on PyPI (the index is an extra one).
"""

from __future__ import annotations

import functools
import html
import http.server
import shutil
import signal
import sys
import tempfile
import urllib.parse
from pathlib import Path


def build_index(wheel_dir: Path, root: Path) -> int:
    """Write ROOT/simple/torch/ linking every torch wheel of `wheel_dir`; how many there are."""
    project = root / "simple" / "torch"
    project.mkdir(parents=True)
    links = []
    for wheel in sorted(wheel_dir.glob("torch-*.whl")):
        (project / wheel.name).symlink_to(wheel.resolve())
        links.append(f'<a href="{urllib.parse.quote(wheel.name)}">{html.escape(wheel.name)}</a><br>')
    page = "<!DOCTYPE html>\n<html><body>\n{}\n</body></html>\n"
    (project / "index.html").write_text(page.format("\n".join(links)), encoding="utf-8")
    (root / "simple" / "index.html").write_text(page.format('<a href="torch/">torch</a>'), encoding="utf-8")
    return len(links)


def main(argv: list[str]) -> int:
    """Serve until SIGTERM or Ctrl-C."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    wheel_dir, port = Path(argv[0]), int(argv[1])
    root = Path(tempfile.mkdtemp(prefix="torch-index-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if build_index(wheel_dir, root) == 0:
            print(f"torch_index: no torch-*.whl in {wheel_dir}", file=sys.stderr)
            return 1
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
            print(f"torch_index: http://127.0.0.1:{port}/simple", flush=True)
            server.serve_forever()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
