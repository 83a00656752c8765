"""End to end: a real Gunicorn process (the Dockerfile's command) driven by service/client.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from charrnn.model.checkpoint import load_checkpoint
from charrnn.model.decoding import SamplingParams
from charrnn.model.generation import generate
from charrnn.service.client import Client, ClientError
from charrnn.service.engine import lstm_kernel
from charrnn.service.engine.thread_names import ENGINE_THREAD, REQUEST_THREAD
from tests.helpers import free_port, log_shows, start_gunicorn, wait_until

if TYPE_CHECKING:
    from tests.helpers import GunicornServer


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gunicorn_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """The shared fixture's server in float32 (CHARRNN_PRECISION=fp32): its seeded texts are `charrnn
    sample`'s, which these tests check; the default, bfloat16 where the CPU has it, gives texts of its own."""
    server = start_gunicorn(model_dir, tmp_path_factory.mktemp("gunicorn") / "server.log", CHARRNN_PRECISION="fp32")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(gunicorn_server: GunicornServer) -> Iterator[Client]:
    with Client(gunicorn_server.url) as client:
        yield client


def expected_text(model_dir: Path, prompt: str, length: int, seed: int, temperature: float = 0.8) -> str:
    """What `charrnn sample --seed` would print for this request."""
    ckpt = load_checkpoint(model_dir / "tiny.safetensors")
    tokens = generate(
        ckpt.build_model(), ckpt.vocab, prompt, length, SamplingParams(temperature=temperature), seed=seed
    )
    return "".join(t.char for t in tokens)


def test_generate_over_http(api: Client, model_dir: Path) -> None:
    answer = api.generate("the cat", max_new_chars=50, seed=3)
    assert answer["choices"][0]["text"] == expected_text(model_dir, "the cat", 50, seed=3)
    assert answer["usage"] == {"prompt_chars": 7, "generated_chars": 50}


def test_stream_over_http_yields_the_same_text(api: Client) -> None:
    pieces = list(api.stream("the cat", max_new_chars=80, seed=5))
    assert "".join(pieces) == api.generate("the cat", max_new_chars=80, seed=5)["choices"][0]["text"]


def test_the_stream_ends_with_a_done_event(api: Client) -> None:
    events = list(api.events("the", max_new_chars=20, seed=1, n=2))
    assert events[-1][0] == "done"
    assert [c["finish_reason"] for c in events[-1][1]["choices"]] == ["length", "length"]


def test_concurrent_requests_each_get_their_own_seeded_text(api: Client) -> None:
    seeds = list(range(100, 112))
    sequential = {s: api.generate("a dog", max_new_chars=60, seed=s)["choices"][0]["text"] for s in seeds}

    def one(seed: int) -> tuple[int, str]:
        if seed % 2:
            return seed, "".join(api.stream("a dog", max_new_chars=60, seed=seed))
        return seed, api.generate("a dog", max_new_chars=60, seed=seed)["choices"][0]["text"]

    with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        concurrent = dict(pool.map(one, seeds))
    assert concurrent == sequential


def test_errors_arrive_as_client_errors_with_the_json_body(api: Client) -> None:
    with pytest.raises(ClientError) as caught:
        api.generate("the", temperature=9)
    assert caught.value.status == 422 and caught.value.code == "invalid_value" and caught.value.field == "temperature"
    with pytest.raises(ClientError) as caught:
        list(api.stream("QQQ"))
    assert caught.value.status == 422 and caught.value.code == "unknown_characters"


def test_models_and_health_over_http(api: Client) -> None:
    assert api.models()["models"][0]["name"] == "tiny"
    assert api.health()["status"] == "ok"


def test_a_body_over_the_limit_is_413_from_gunicorn(gunicorn_server: GunicornServer) -> None:
    body = b'{"prompt": "' + b"a" * 10_000_000 + b'"}'
    response = requests.post(
        gunicorn_server.url + "/generate", data=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("raw", [b'{"temperature": NaN}', b"[" * 10_000 + b"]" * 10_000])
def test_non_json_numbers_and_deep_nesting_are_400_from_gunicorn(gunicorn_server: GunicornServer, raw: bytes) -> None:
    response = requests.post(
        gunicorn_server.url + "/generate", data=raw, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_no_answer_is_a_client_error_too() -> None:
    with pytest.raises(ClientError) as caught:
        Client("http://127.0.0.1:1", timeout=5).health()
    assert caught.value.status is None and caught.value.code == "connection_error"


def test_sigterm_lets_streams_in_flight_finish(start_server: Callable[..., GunicornServer]) -> None:
    # Long streams whose client stops reading after the first chunk: the server's writes block, so
    # the streams are still in flight when SIGTERM arrives.
    length = 60_000
    server = start_server(CHARRNN_MAX_NEW_CHARS=str(length), CHARRNN_GRACEFUL_TIMEOUT="120")
    api = Client(server.url)
    started = [threading.Event() for _ in range(16)]
    signalled = threading.Event()
    results: dict[int, tuple[str, dict]] = {}

    def consume(i: int) -> None:
        text, done = "", {}
        for event, data in api.events("the", max_new_chars=length, seed=i):
            if event == "chunk":
                text += data["text"]
                if not started[i].is_set():
                    started[i].set()
                    signalled.wait(30)  # read nothing more until the server has been told to stop
            else:
                done = data
        results[i] = (text, done)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(started))]
    try:
        for thread in threads:
            thread.start()
        for event in started:
            assert event.wait(60), server.log()
        server.process.send_signal(signal.SIGTERM)
        log_shows(server, "Handling signal: term")  # the master has it, and passes it to the worker now
        signalled.set()
        for thread in threads:
            thread.join(150)
        assert server.process.wait(60) == 0
    finally:
        signalled.set()
    log = server.log()
    for i in range(len(started)):
        text, done = results[i]
        assert len(text) == length and done["choices"][0]["finish_reason"] == "length"
    assert log.count('"POST /generate HTTP/1.1" 200') == len(started)
    assert log.index("Handling signal: term") < log.index('"POST /generate HTTP/1.1" 200'), log
    assert "engine stopped" in log
    with pytest.raises(ClientError):
        Client(server.url, timeout=5).health()


def test_the_master_imports_and_checks_the_models_before_listening(start_server: Callable[..., GunicornServer]) -> None:
    """service/web/warm_start.py: no connection waits for the imports. The worker that replaces a dead one is
    forked from that master too, and generates with a torch thread pool of its own."""
    server = start_server(CHARRNN_TORCH_THREADS="2")  # one worker
    log = server.log()
    assert log.index("warm start: torch and the app imported") < log.index("Listening at") < log.index("Booting worker")
    api = Client(server.url)
    first = api.models()["worker"]
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: server.log().count("Booting worker") == 2, 60, lambda: f"a new worker:\n{server.log()}")
    wait_until(lambda: Client(server.url).models()["worker"] != first, 60, "the new worker to answer")
    assert api.generate("the", max_new_chars=20, seed=1)["usage"]["generated_chars"] == 20
    assert "torch uses 2 threads" in server.log()


def test_charrnn_serve_runs_the_service(model_dir: Path, start_server: Callable[..., GunicornServer]) -> None:
    # The flags win over the environment the fixture sets (its CHARRNN_MODEL_DIR points elsewhere).
    port = free_port()
    command = [sys.executable, "-m", "charrnn.cli", "serve", "--model-dir", str(model_dir), "--port", str(port)]
    server = start_server(command, CHARRNN_MODEL_DIR="/nonexistent", CHARRNN_PORT=str(port))
    assert Client(server.url).generate("the", max_new_chars=5)["usage"]["generated_chars"] == 5
    assert server.stop() == 0


def test_a_metric_file_a_worker_has_only_created_is_left_out_of_a_scrape(tmp_path: Path) -> None:
    # A worker creates its metric file, then sizes it; a scrape in between once answered 500 in CI.
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from charrnn.service.web.metrics import _WrittenFilesCollector

    written = MmapedDict(str(tmp_path / "counter_1.db"))
    key = mmap_key("charrnn_generated_chars", "charrnn_generated_chars_total", ["model"], ["tiny"], "help")
    written.write_value(key, 5.0, 0.0)
    written.close()
    (tmp_path / "counter_2.db").touch()  # the other worker, between its open() and its truncate()
    registry = CollectorRegistry()
    _WrittenFilesCollector(registry, path=str(tmp_path))
    assert 'charrnn_generated_chars_total{model="tiny"} 5.0' in generate_latest(registry).decode()


def test_with_two_workers_metrics_add_up_over_both(start_server: Callable[..., GunicornServer]) -> None:
    server = start_server(CHARRNN_WORKERS="2")
    api = Client(server.url)
    for seed in range(8):
        api.generate("the", max_new_chars=5, seed=seed)
    in_flight: list[float] = []

    def scrape() -> float:  # whichever worker answers the scrape, it reports the sum over both
        text = requests.get(server.url + "/metrics", timeout=30).text
        assert 'charrnn_http_requests_total{method="POST",route="/generate",status="200"} 8.0' in text
        assert 'charrnn_generated_chars_total{model="tiny"} 40.0' in text
        (line,) = (line for line in text.splitlines() if line.startswith("charrnn_http_requests_in_flight "))
        in_flight.append(float(line.split()[1]))
        return in_flight[-1]

    for _ in range(8):
        scrape()
    # The scrape itself is in flight; the previous scrape may not have been closed yet when this one is
    # counted. Once it has, a scrape counts itself alone.
    wait_until(lambda: 1.0 in in_flight or scrape() == 1.0, 30, lambda: f"a scrape counting only itself: {in_flight}")
    assert all(1.0 <= count <= 2.0 for count in in_flight), in_flight
    assert 1.0 in in_flight, in_flight
    assert server.stop() == 0


@pytest.mark.skipif(
    shutil.which("cc") is None or lstm_kernel.cpu_variants()[0] == "portable",
    reason="no C kernel with helper threads here (no compiler, or the portable build)",
)
def test_two_workers_share_the_cores_through_a_board_the_master_removes(
    start_server: Callable[..., GunicornServer],
) -> None:
    # Torch's threads left to the service (the tests' servers otherwise pin them to one): each worker's C
    # kernel may use every core, and shares them with the other worker through a board in memory.
    server = start_server(CHARRNN_WORKERS="2", CHARRNN_TORCH_THREADS="")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    api = Client(server.url)
    with ThreadPoolExecutor(4) as pool:
        texts = list(
            pool.map(lambda seed: api.generate("the", max_new_chars=40, seed=seed)["choices"][0]["text"], range(8))
        )
    assert all(len(text) == 40 for text in texts)
    forked = wait_until(
        lambda: (
            (lines := [line for line in server.log().splitlines() if "the C kernel up to" in line])
            and len(lines) == 2
            and lines
        ),
        30,
        server.log,
    )
    assert all(f"the C kernel up to {cores} (the cores, shared with the other workers)" in line for line in forked)
    joined = wait_until(
        lambda: [line for line in server.log().splitlines() if "sharing the cores with" in line], 30, server.log
    )
    board = Path(joined[0].rsplit("(", 1)[1].rstrip(")"))
    assert board.is_file() and board.stat().st_size == 4096
    assert server.stop() == 0
    assert not board.exists()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc (Linux)")
def test_a_stream_cut_off_by_a_dying_server_is_a_client_error(start_server: Callable[..., GunicornServer]) -> None:
    server = start_server(CHARRNN_MAX_NEW_CHARS="1000000")  # far more than the socket buffers hold
    events = Client(server.url).events("the", max_new_chars=1_000_000)
    assert next(events)[0] == "chunk"
    master = server.process.pid
    (worker,) = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    os.kill(int(worker), signal.SIGKILL)  # the worker answering the stream dies mid-stream
    with pytest.raises(ClientError) as caught:
        for _ in events:
            pass
    assert caught.value.code in ("connection_error", "incomplete_stream")


def _threads(pid: int) -> dict[int, tuple[str, int]]:
    """The OS name and CPU scheduling policy (field 41 of /proc/PID/task/TID/stat) of each thread of `pid`."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            stat = (task / "stat").read_text()
            threads[int(task.name)] = (
                (task / "comm").read_text().strip(),
                int(stat[stat.rindex(")") + 2 :].split()[38]),
            )
    return threads


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize("give_way", [True, False])
def test_request_threads_give_way_to_the_engine(start_server: Callable[..., GunicornServer], give_way: bool) -> None:
    """Request threads are named charrnn-request (and, by default, run under SCHED_BATCH); the main thread
    and the engine's keep the usual policy."""
    server = start_server(CHARRNN_REQUEST_THREADS_YIELD=str(give_way).lower(), CHARRNN_THREADS="4")
    client = Client(server.url)
    with ThreadPoolExecutor(4) as pool:  # several request threads, each answering a stream
        texts = list(pool.map(lambda seed: "".join(client.stream("the", max_new_chars=200, seed=seed)), range(8)))
    assert all(len(text) == 200 for text in texts)
    master = server.process.pid
    (worker,) = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    threads = _threads(int(worker))
    requests = {tid for tid, (name, _) in threads.items() if name == REQUEST_THREAD}
    batch = {tid for tid, (_, policy) in threads.items() if policy == os.SCHED_BATCH}
    assert requests and int(worker) not in requests
    assert threads[int(worker)][1] == os.SCHED_OTHER  # the main thread: Gunicorn's accept loop
    engine = [policy for name, policy in threads.values() if name == ENGINE_THREAD]  # and torch's threads it started
    assert engine and set(engine) == {os.SCHED_OTHER}
    assert batch == (requests if give_way else set())
