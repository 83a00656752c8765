"""Gunicorn's gthread worker, but a connection that ends is closed on a thread of its own, not the main loop's.

Since Gunicorn 26, a connection that does not stay alive (an HTTP/1.0 client, `Connection: close`, a worker
that stops) is closed as RFC 9112 section 9.6 asks: a FIN, then whatever the client still sends is read until
it closes its side, for up to 2 s, so that unread bytes do not turn the close into a reset that truncates the
answer. Gunicorn does that wait on the worker's main thread, the one that accepts connections and hands ready
ones to the request threads: while it waits, no other client of the worker is served. A client that reads its
answer and keeps the socket open stalled every other request of the worker for 2 s (tests/web/
test_service_gunicorn.py), and under load every close waited for the client's own turn on the CPU.

Here the same close (the FIN at once, then the lingering read, at most LINGER_SECONDS and MAX_DRAIN_BYTES) runs
on one closer thread per worker that watches every closing socket with a selector, so the main loop goes on at
once. At most `worker_connections` sockets linger (Gunicorn's bound on a worker's connections; a lingering one
holds a descriptor); past that a connection is closed at once, as Gunicorn before 26 did. A stopping worker
waits for the lingering closes (LINGER_SECONDS at most) before its process ends. Everything else is Gunicorn's
own ThreadWorker; the subclass repeats the choice its `finish_request(conn, fs)` makes between keeping a
connection and closing it, as Gunicorn 27 makes it (pyproject.toml asks for 27.x).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

from gunicorn.workers import gthread

from charrnn.service.engine.thread_names import CLOSER_THREAD, name_os_thread

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0  # Gunicorn's own bound on the wait for the client's close
MAX_DRAIN_BYTES = 65536  # and on what is read meanwhile


class Closer:
    """Closes sockets gracefully on a daemon thread of its own: FIN now, the socket itself once the peer has
    closed its side, or has sent MAX_DRAIN_BYTES, or LINGER_SECONDS have passed."""

    def __init__(self, linger: float = LINGER_SECONDS, max_drain: int = MAX_DRAIN_BYTES):
        self.linger, self.max_drain = linger, max_drain
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)  # a full pipe has woken the thread already
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._incoming: deque[socket.socket] = deque()  # handed over by close(), taken by the thread
        self._closing: dict[socket.socket, list[float]] = {}  # socket -> [deadline, bytes drained]
        self._count = 0  # sockets handed over and not closed yet
        self._counted = threading.Condition()  # guards _count; notified when it reaches 0
        threading.Thread(target=self._run, name=CLOSER_THREAD, daemon=True).start()

    def close(self, sock: socket.socket) -> None:
        """Send the FIN now; the socket is closed later, by the closer's thread."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:  # the peer has gone already
            sock.close()
            return
        with self._counted:
            self._count += 1
        self._incoming.append(sock)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"\0")

    @property
    def lingering(self) -> int:
        """Sockets sent their FIN and not closed yet."""
        return self._count

    def wait(self, timeout: float) -> bool:
        """Wait until no socket lingers, at most `timeout` seconds; whether none does."""
        with self._counted:
            return self._counted.wait_for(lambda: self._count == 0, timeout)

    def _run(self) -> None:
        name_os_thread()
        while True:
            try:
                self._turn()
            except Exception:  # a socket the thread cannot handle must not end the thread (and leak every later one)
                log.exception("the connection closer failed; it goes on")

    def _turn(self) -> None:
        deadlines = [deadline for deadline, _ in self._closing.values()]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        for key, _ in self._selector.select(timeout):
            if key.fileobj == self._wake_read:
                self._take_incoming()
            else:
                self._drain(key.fileobj)  # type: ignore[arg-type]
        now = time.monotonic()
        for sock in [s for s, (deadline, _) in self._closing.items() if deadline <= now]:
            self._finish(sock)

    def _take_incoming(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_read, 4096):
                pass
        while self._incoming:
            sock = self._incoming.popleft()
            self._closing[sock] = [time.monotonic() + self.linger, 0]
            self._selector.register(sock, selectors.EVENT_READ)

    def _drain(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        state = self._closing[sock]
        state[1] += len(data)
        if not data or state[1] >= self.max_drain:
            self._finish(sock)

    def _finish(self, sock: socket.socket) -> None:
        del self._closing[sock]
        with contextlib.suppress(KeyError, ValueError):  # ValueError: a socket closed meanwhile (fd -1)
            self._selector.unregister(sock)
        sock.close()
        with self._counted:
            self._count -= 1
            if not self._count:
                self._counted.notify_all()


class ThreadWorker(gthread.ThreadWorker):
    """gthread, with the graceful close of a finished connection on a Closer (see the module's text)."""

    def init_process(self) -> None:
        self.closer = Closer()  # in the worker process, after the fork: its thread is this process's
        super().init_process()

    def run(self) -> None:
        super().run()  # returns when the worker stops
        self.closer.wait(self.closer.linger)  # the closes under way end as they would have, not as the process does

    def finish_request(self, conn: Any, fs: Future) -> None:
        try:
            closes = not (fs.result() if not fs.cancelled() else False)
        except Exception:  # the request failed: Gunicorn closes the connection at once, without lingering
            closes = False
        if not closes:  # kept alive, deferred or failed: as Gunicorn does it
            super().finish_request(conn, fs)
            return
        self.nr_conns -= 1
        if self.closer.lingering < self.worker_connections:
            self.closer.close(conn.sock)
        else:  # as many lingering as the worker may hold connections: no more descriptors for them
            conn.close()
