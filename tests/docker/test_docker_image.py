"""The image built from the Dockerfile, run as the README runs it: health, user, read-only root, the API,
mounted models, training into a volume served by the compose file, and a clean stop with streams in flight."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.docker import commands
from tests.docker.tools import BASE, Compose, Container, docker, run, wait_for

# The first test to ask for the image waits for its build (minutes): more than the suite's 300 s per test.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

MAX_ADDED_BYTES = 850_000_000


# The top-level names the image's site-packages holds that are ours (the distributions' own files).
TOP_LEVEL = (
    "import importlib.metadata as m; "
    "print(*sorted({f.parts[0] for f in m.files('charrnn') if not f.parts[0].endswith('.dist-info')} - {'..'}))"
)


def sse_events(response: requests.Response) -> list[tuple[str, dict]]:
    """(event, data) of a text/event-stream response, read as it arrives."""
    events, name = [], "message"
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
            name = "message"
    return events


def generate(url: str, **body: object) -> dict:
    response = requests.post(url + "/generate", json={"prompt": "the ", "max_new_chars": 40, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def default_container(start_container: Callable[..., Container]) -> Container:
    """The image with its own default model, read-only, as the README's first `docker run`."""
    return start_container(commands.RUN_DEFAULT)


def test_the_image_adds_at_most_850_mb_to_its_base(image: str, figures: dict[str, str]) -> None:
    sizes = [int(docker("image", "inspect", "--format", "{{.Size}}", name).stdout) for name in (image, BASE)]
    added = sizes[0] - sizes[1]
    figures["image size above its base"] = f"{added / 1e6:.0f} MB (base {sizes[1] / 1e6:.0f} MB)"
    assert added <= MAX_ADDED_BYTES, f"the image adds {added / 1e6:.0f} MB to its base"


def test_the_image_has_cpu_torch_and_the_kernels_for_every_cpu(image: str) -> None:
    probe = (
        "import torch; from charrnn.model.cpu import has_bf16_dot; from charrnn.service.engine import lstm_kernel;"
        " lib = lstm_kernel.load();"
        " print(torch.__version__, lib is not None, bool(lib.charrnn_has_bf16()) == has_bf16_dot())"
    )
    result = docker("run", "--rm", "--network", "none", image, "python", "-c", probe)
    # the kernel built ahead for this CPU: the bfloat16 build where it has AVX512-BF16, else another
    assert result.stdout.split() == ["2.13.0+cpu", "True", "True"], result.stderr


def test_the_image_holds_the_code_once_in_the_installed_package(image: str) -> None:
    """No sources beside /opt/venv; the working directory (first on Gunicorn's sys.path) is empty."""
    (workdir,) = docker("image", "inspect", "--format", "{{.Config.WorkingDir}}", image).stdout.split()
    listing = docker("run", "--rm", "--network", "none", image, "ls", "-A", workdir).stdout
    assert listing == "", f"{workdir} holds {listing.split()}"
    find = ["find", "/", "-xdev", "-name", "gunicorn_conf.py"]  # as root: the app user cannot read all of /
    found = docker("run", "--rm", "--network", "none", "--user", "0", image, *find)
    (conf,) = found.stdout.split()
    assert conf.startswith("/opt/venv/lib/") and conf.endswith("/site-packages/charrnn/service/web/gunicorn_conf.py")
    probe = "from charrnn.service.config import ServiceConfig; print(ServiceConfig().model_dir)"
    (model_dir,) = docker("run", "--rm", "--network", "none", image, "python", "-c", probe).stdout.split()
    assert model_dir == conf.replace("web/gunicorn_conf.py", "default_model")  # the package's own default model
    listing = docker("run", "--rm", "--network", "none", image, "python", "-c", TOP_LEVEL).stdout.split()
    assert listing == ["charrnn"]  # one installed name: no `model` or `service` in site-packages


def test_the_container_runs_as_a_non_root_user_on_a_read_only_root(default_container: Container) -> None:
    status = docker("exec", default_container.name, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {"10001"}
    write = docker("exec", default_container.name, "touch", "/app/x", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    docker("exec", default_container.name, "touch", "/tmp/x")  # the tmpfs


def test_generate_stream_completions_and_metrics_answer(default_container: Container) -> None:
    url = default_container.url
    answer = generate(url, seed=3)
    assert answer["model"] == "shakespeare" and len(answer["choices"][0]["text"]) == 40
    assert generate(url, seed=3)["choices"] == answer["choices"]  # seeded: the same text again
    with requests.post(
        url + "/generate", json={"prompt": "the ", "max_new_chars": 60, "stream": True}, stream=True, timeout=60
    ) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1][0] == "done" and "".join(data["text"] for name, data in events if name == "chunk")
    completion = requests.post(
        url + "/v1/completions", json={"model": "shakespeare", "prompt": "the ", "max_tokens": 20}, timeout=60
    )
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion"
    metrics = requests.get(url + "/metrics", timeout=30)
    assert metrics.status_code == 200 and "charrnn_" in metrics.text


def test_the_health_check_turns_healthy(default_container: Container) -> None:
    """The Dockerfile's HEALTHCHECK as it is (first check after its 30 s interval)."""
    status = lambda: default_container.inspect("{{.State.Health.Status}}")  # noqa: E731
    wait_for(lambda: status() == "healthy", 150, "the health check", logs=default_container.logs)


@pytest.fixture(scope="module")
def host_models(words_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory trained on the host by `charrnn train --preset tiny` (readable by uid 10001)."""
    models = tmp_path_factory.mktemp("models")
    models.chmod(0o755)
    charrnn = Path(sys.executable).with_name("charrnn")
    run(
        [
            str(charrnn),
            "train",
            "--corpus",
            str(words_text / "words.txt"),
            "--out",
            str(models / "words"),
            "--preset",
            "tiny",
            "--no-progress",
        ],
        timeout=600,
    )
    return models


def test_a_model_directory_trained_on_the_host_is_what_it_serves(start_container, host_models: Path) -> None:
    container = start_container(commands.RUN_MODELS, models=host_models)
    listing = requests.get(container.url + "/models", timeout=30).json()
    assert listing["default"] == "words" and [m["name"] for m in listing["models"]] == ["words"]
    (model,) = listing["models"]
    assert model["steps"] == 200 and model["corpus"] == "words" and model["hidden"] == 64  # --preset tiny
    assert len(generate(container.url, model="words", max_new_chars=200)["choices"][0]["text"]) == 200


def test_training_in_the_image_into_the_volume_is_what_compose_serves(compose: Compose, words_text: Path) -> None:
    trained = compose(commands.COMPOSE_TRAIN, texts=words_text)
    assert "checkpoints in /models/words" in trained.stdout + trained.stderr
    compose(commands.COMPOSE_UP)
    container = Container(f"{compose.project}_serve_1", f"http://127.0.0.1:{compose.env['CHARRNN_SERVE_PORT']}")
    container.wait_until_ready()
    assert [m["name"] for m in requests.get(container.url + "/models", timeout=30).json()["models"]] == ["words"]
    generate(container.url, model="words")
    compose(commands.COMPOSE_STOP, timeout=120)
    assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()


def test_the_compose_file_with_its_proxy_is_valid(compose: Compose) -> None:
    """What `docker-compose --profile proxy up` reads: the proxy built from deploy/proxy/Dockerfile (Debian's
    nginx; no registry image can be pulled here), in front of `serve` by name."""
    config = compose("docker-compose --profile proxy config")
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    assert f"context: {deploy}\n" in config.stdout, config.stdout  # made absolute
    assert "dockerfile: proxy/Dockerfile" in config.stdout and (deploy / "proxy" / "Dockerfile").is_file()
    assert "CHARRNN_UPSTREAM: serve:8000" in config.stdout, config.stdout


def test_docker_stop_lets_the_streams_in_flight_finish_and_exits_0(start_container) -> None:
    """One generation at a time, three long ones (~0.2 ms a character here): when SIGTERM comes, one stream
    runs and two wait; Gunicorn's 30 s of grace lets all three finish. One worker, so that one engine
    holds all three (/health reports its own worker's)."""
    settings = (
        "CHARRNN_WORKERS=1",
        "CHARRNN_MAX_BATCH=1",
        "CHARRNN_THREADS=8",
        "CHARRNN_MAX_CLIENT_JOBS=0",
        "CHARRNN_MAX_NEW_CHARS=15000",
    )
    container = start_container(commands.RUN_DEFAULT, *settings)
    results: list[list[dict]] = []

    def one_stream(seed: int) -> None:
        body = {"prompt": "the ", "max_new_chars": 15000, "stream": True, "seed": seed}
        with requests.post(container.url + "/generate", json=body, stream=True, timeout=120) as response:
            results.append(sse_events_rest(response.iter_lines(decode_unicode=True)))

    threads = [threading.Thread(target=one_stream, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    load = lambda: requests.get(container.url + "/health", timeout=30).json()  # noqa: E731
    wait_for(lambda: (load()["active"], load()["queue_depth"]) == (1, 2), 60, "three streams in flight")
    docker(*commands.argv(commands.STOP, name=container.name)[1:], timeout=90)
    for thread in threads:
        thread.join(120)
    assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()
    assert len(results) == 3
    for events in results:
        done = events[-1]
        assert done["choices"][0]["finish_reason"] == "length" and done["usage"]["generated_chars"] == 15000
    log = container.logs()
    assert log[log.index("Handling signal: term") :].count("POST /generate") >= 2, log  # they ended after it


def sse_events_rest(lines) -> list[dict]:
    """The data of each event in `lines` (an SSE body's lines)."""
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
