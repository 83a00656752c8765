"""The worker's closer (service/web/worker.py): a finished connection lingers on its own thread, not the main loop."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from charrnn.service.web.worker import Closer
from tests.helpers import wait_until

if TYPE_CHECKING:
    from tests.helpers import GunicornServer


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A loopback TCP connection: (the client's end, the server's end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    yield client, server
    client.close()
    server.close()


def read_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_the_client_gets_the_answer_and_the_fin_at_once_and_the_socket_closes_when_it_closes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    closer = Closer(linger=60)
    server.sendall(b"the answer")
    closer.close(server)
    assert read_to_eof(client) == b"the answer"  # the FIN came: the client saw its end of file
    assert closer.lingering == 1  # and the server's end waits for the client's close (60 s at most)
    client.sendall(b"bytes the server never read")  # drained, not answered with a reset
    assert closer.lingering == 1
    client.close()
    wait_until(lambda: closer.lingering == 0, 10, "the closer to close the socket once the client had")
    assert server.fileno() == -1


def test_a_client_that_never_closes_is_closed_after_the_linger(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    closer = Closer(linger=0.2)
    closer.close(server)
    assert read_to_eof(client) == b""
    wait_until(lambda: closer.lingering == 0, 10, "the closer to give up on the client after its linger")
    assert server.fileno() == -1


def test_a_client_that_sends_too_much_is_closed_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    closer = Closer(linger=60, max_drain=1000)
    closer.close(server)
    client.sendall(b"x" * 5000)
    wait_until(lambda: closer.lingering == 0, 10, "the closer to stop draining past max_drain")


def _peers(pid: int) -> set[int]:
    """The remote ports of the TCP (IPv4) connections process `pid` holds open."""
    inodes = {os.readlink(fd)[len("socket:[") : -1] for fd in Path(f"/proc/{pid}/fd").iterdir()}
    inodes.discard("")
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()  # sl local_address rem_address st ... uid timeout inode
        if fields[9] in inodes and fields[2] != "00000000:0000":
            ports.add(int(fields[2].split(":")[1], 16))
    return ports


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads the worker's sockets in /proc (Linux)")
def test_clients_that_keep_their_sockets_open_stall_no_one(start_server: Callable[..., GunicornServer]) -> None:
    """Gunicorn 26+ waits up to 2 s on the worker's main loop for each such client; here the closer waits."""
    server = start_server()
    master = server.process.pid
    (worker,) = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    host, port = server.url.removeprefix("http://").split(":")
    holders = [socket.create_connection((host, int(port))) for _ in range(2)]
    ports = {holder.getsockname()[1] for holder in holders}
    try:
        for holder in holders:  # each reads its whole answer (to the FIN) and keeps its socket open
            holder.sendall(b"GET /health/live HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_to_eof(holder).startswith(b"HTTP/1.0 200")
        with requests.get(f"{server.url}/health/live", headers={"Connection": "close"}, timeout=30) as answer:
            assert answer.status_code == 200
        # answered while both still linger: nothing waited for them (Gunicorn's own close had the second
        # holder's FIN wait for the first's 2 s, and this request for both)
        assert ports <= _peers(int(worker))
        wait_until(lambda: not ports & _peers(int(worker)), 30, "the worker to close the lingering sockets")
    finally:
        for holder in holders:
            holder.close()


def test_a_stopping_worker_waits_for_the_lingering_closes(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    closer = Closer(linger=60)
    closer.close(server)
    assert not closer.wait(0.01)  # the client has not closed: the socket lingers
    client.close()
    assert closer.wait(30)  # and once it has, nothing does
    assert closer.lingering == 0
