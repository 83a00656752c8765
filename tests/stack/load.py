"""Load through the proxy for the stack tier: streaming and non-streaming clients that each send one request
after another, recording per request when it started, how long its first character took, and how it ended.

A request counts as failed unless it is answered 200 with every character it asked for (a stream: its
`done` event after all its chunks). `Load.phase` names the change under way; each request is filed under
the phase in which it started.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import requests

STREAM_CHARS = 300
PLAIN_CHARS = 60
CLIENT_TIMEOUT = 180.0  # a request caught by a frozen replica waits for its kill, then nginx retries it


@dataclass
class Outcome:
    """One request: its phase, kind, start (monotonic s), first character (s after start), error if any."""

    phase: str
    kind: str
    start: float
    first_char: float | None = None
    answered_at: float | None = None  # when the first byte of the answer came (monotonic s)
    ended_at: float | None = None
    chars: int = 0  # characters received
    error: str | None = None


@dataclass
class Load:
    """`streams` streaming and `plain` non-streaming clients against `url` until `stop()`."""

    url: str
    streams: int = 4
    plain: int = 4
    phase: str = "before"
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        kinds = ["stream"] * self.streams + ["plain"] * self.plain
        self._threads = [
            threading.Thread(target=self._client, args=(kind, i), daemon=True) for i, kind in enumerate(kinds)
        ]

    def start(self) -> Load:
        """Start the clients."""
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Outcome]:
        """Stop the clients once their requests in flight have ended; every outcome."""
        self._stop.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT + 30)
        return self.outcomes

    def _client(self, kind: str, index: int) -> None:
        session = requests.Session()
        seed = index * 1_000_000
        while not self._stop.is_set():
            seed += 1
            outcome = Outcome(self.phase, kind, time.monotonic())
            try:
                (stream if kind == "stream" else plain)(session, self.url, seed, outcome)
            except (requests.RequestException, ValueError, KeyError) as error:
                outcome.error = f"{type(error).__name__}: {error}"
            outcome.ended_at = time.monotonic()
            with self._lock:
                self.outcomes.append(outcome)


def plain(session: requests.Session, url: str, seed: int, outcome: Outcome) -> None:
    """POST /generate, the whole answer at once; its time to the answer is its first character's."""
    body = {"prompt": "ROMEO:", "max_new_chars": PLAIN_CHARS, "seed": seed}
    response = session.post(url + "/generate", json=body, timeout=CLIENT_TIMEOUT)
    outcome.answered_at = time.monotonic()
    if response.status_code != 200:
        raise ValueError(f"status {response.status_code}: {response.text[:200]}")
    if len(response.json()["choices"][0]["text"]) != PLAIN_CHARS:
        raise ValueError(f"a short answer: {response.text[:200]}")
    outcome.first_char = time.monotonic() - outcome.start


def stream(session: requests.Session, url: str, seed: int, outcome: Outcome) -> None:
    """POST /generate with stream=true, read to its `done` event."""
    body = {"prompt": "JULIET:", "max_new_chars": STREAM_CHARS, "seed": seed, "stream": True}
    with session.post(url + "/generate", json=body, stream=True, timeout=CLIENT_TIMEOUT) as response:
        outcome.answered_at = time.monotonic()
        if response.status_code != 200:
            raise ValueError(f"status {response.status_code}: {response.text[:200]}")
        chars, event, done = 0, "message", False
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "chunk":
                chars += len(json.loads(line[6:])["text"])
                outcome.chars = chars
                if outcome.first_char is None:
                    outcome.first_char = time.monotonic() - outcome.start
            elif line.startswith("data: ") and event == "done":
                done = True
            elif line.startswith("data: ") and event == "error":
                raise ValueError(f"an error event: {line}")
    if not done or chars != STREAM_CHARS:
        raise ValueError(f"a stream cut short: {chars} of {STREAM_CHARS} characters, done={done}")


def p99(values: list[float]) -> float | None:
    """The 99th percentile (nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
