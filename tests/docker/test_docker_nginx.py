"""deploy/nginx.conf (the compose file's proxy) run by Debian's nginx in front of a real Gunicorn: slow clients
wait in nginx, not in Gunicorn's threads; requests, streams and the body limit still work through it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import string
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import requests

from tests.docker.tools import REPO, run, unavailable, wait_for
from tests.helpers import free_port

pytestmark = pytest.mark.docker

# The http-context file is included the way the nginx image includes conf.d/*.conf (inside `http { }`).
MAIN_CONF = """
{user}
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/charrnn.conf;
}}
"""


def render(upstream: str, listen: str) -> str:
    """deploy/nginx.conf with its two variables filled in, as deploy/proxy/entrypoint.sh does (one upstream)."""
    template = string.Template((REPO / "deploy" / "nginx.conf").read_text(encoding="utf-8"))
    return template.safe_substitute(CHARRNN_UPSTREAM_SERVERS=f"server {upstream};", CHARRNN_PROXY_PORT=listen)


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Starts Debian's nginx with deploy/nginx.conf in front of an upstream host:port; its URL."""
    if shutil.which("nginx") is None:
        unavailable("no nginx (Debian: apt-get install nginx)")
    processes: list[subprocess.Popen] = []

    def start(upstream: str) -> str:
        port = free_port()
        (tmp_path / "charrnn.conf").write_text(render(upstream, f"127.0.0.1:{port}"), encoding="utf-8")
        user = "user root;" if os.geteuid() == 0 else ""  # workers must reach the temporary paths
        (tmp_path / "nginx.conf").write_text(MAIN_CONF.format(dir=tmp_path, user=user), encoding="utf-8")
        command = ["nginx", "-e", str(tmp_path / "error.log"), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
        run([*command, "-t"])  # a syntax error in deploy/nginx.conf fails here, with nginx's message
        processes.append(subprocess.Popen(command))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: reachable(url), 30, "nginx", processes[-1])
        return url

    yield start
    for process in processes:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def reachable(url: str) -> bool:
    try:
        requests.get(url + "/health/live", timeout=5)
        return True
    except requests.RequestException:
        return False


@contextmanager
def slow_header_clients(url: str, count: int) -> Iterator[None]:
    """`count` connections that send part of their headers and then nothing."""
    host, port = url.removeprefix("http://").split(":")
    with ExitStack() as stack:
        for _ in range(count):
            sock = stack.enter_context(socket.create_connection((host, int(port)), timeout=10))
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        yield


def stream_events(url: str) -> list[tuple[str, dict]]:
    body = {"prompt": "the ", "max_new_chars": 300, "stream": True}
    events, name = [], "message"
    with requests.post(url + "/generate", json=body, stream=True, timeout=30) as response:
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_slow_header_clients_hold_gunicorn_threads_without_the_proxy(start_server) -> None:
    """The defect the proxy is for: CHARRNN_THREADS + 1 slow clients, and a normal request gets no answer."""
    server = start_server(CHARRNN_THREADS="4")
    with slow_header_clients(server.url, 5), pytest.raises(requests.Timeout):
        requests.get(server.url + "/health/live", timeout=3)


def test_behind_nginx_200_slow_header_clients_do_not_stop_requests_or_streams(start_server, start_nginx) -> None:
    server = start_server(CHARRNN_THREADS="4")
    url = start_nginx(server.url.removeprefix("http://"))
    with slow_header_clients(url, 200):
        answer = requests.post(url + "/generate", json={"prompt": "the ", "max_new_chars": 50}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["choices"][0]["text"]) == 50
        events = stream_events(url)
        assert events[-1][0] == "done" and events[-1][1]["usage"]["generated_chars"] == 300
        assert sum(len(data["text"]) for name, data in events if name == "chunk") == 300
        assert requests.get(url + "/health", timeout=30).json()["status"] == "ok"


def test_nginx_refuses_a_body_over_the_service_limit(start_server, start_nginx) -> None:
    """client_max_body_size is CHARRNN_MAX_BODY_BYTES (64 KiB): over it, 413 before Gunicorn reads a byte."""
    server = start_server()
    url = start_nginx(server.url.removeprefix("http://"))
    prompt = {"prompt": "a" * 100, "max_new_chars": 1}
    padding = 64 * 1024 - len(json.dumps(prompt)) - len(', "x": ""')
    just_fits = requests.post(url + "/generate", json=prompt | {"x": "b" * padding}, timeout=30)
    assert just_fits.status_code != 413
    assert requests.post(url + "/generate", json=prompt | {"x": "b" * (padding + 1)}, timeout=30).status_code == 413
