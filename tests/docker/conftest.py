"""The docker tier (`make test-docker`): the image built from the repository's Dockerfile, run for real.

Fixtures: a Docker engine, the stand-in base image, a pip index serving the local torch wheel, the image
(built once per session), containers on free loopback ports (removed afterwards), the compose project.
Where a piece is missing, a developer's run skips with the reason; under CI=true it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.docker import commands
from tests.helpers import wait_until
from tests.service.conftest import free_port, make_text, model_dir, start_server  # noqa: F401 -- fixtures

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"
BASE = "charrnn-base:bookworm"
IMAGE = "charrnn:test"
WHEEL_DIR = Path(os.environ.get("CHARRNN_TORCH_WHEELS", "/opt/wheels"))
# What the tier measured (build time, image size), reported at the end of the session.
FIGURES = pytest.StashKey[dict]()


def unavailable(reason: str) -> None:
    """Skip on a developer's machine; fail in CI, where the docker tier must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the docker tier must run, not skip)", pytrace=False)
    pytest.skip(reason)


def run(argv: list[str], timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command (output captured); a failure names the command and shows its output."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def docker(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`docker ARGS`."""
    return run(["docker", *args], **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[FIGURES] = {}


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """The figures of this run: build time and the image's size above its base."""
    for key, value in config.stash.get(FIGURES, {}).items():
        terminalreporter.write_line(f"docker tier: {key}: {value}")


@pytest.fixture(scope="session")
def figures(pytestconfig: pytest.Config) -> dict[str, str]:
    """Figures to report at the end of the session."""
    return pytestconfig.stash[FIGURES]


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """A Docker engine that answers."""
    if shutil.which("docker") is None:
        unavailable("no `docker` command (Debian: apt-get install docker.io)")
    if run(["docker", "info"], check=False).returncode != 0:
        unavailable("no Docker engine answers `docker info` (start dockerd: see README, Docker)")


@pytest.fixture(scope="session")
def base_image(docker_engine: None) -> str:
    """The stand-in for python:3.11-slim-bookworm (debootstrap; kept between runs)."""
    if docker("image", "inspect", BASE, check=False).returncode != 0:
        if shutil.which("debootstrap") is None or os.geteuid() != 0:
            unavailable(f"no image {BASE}, and building it needs root and debootstrap")
        run(commands.argv(commands.BUILD_BASE, base=BASE), timeout=1200, cwd=REPO)
    return BASE


@pytest.fixture(scope="session")
def torch_index() -> Iterator[int]:
    """tests/docker/torch_index.py serving the local torch wheel; its port."""
    if not list(WHEEL_DIR.glob("torch-2.13.0+cpu-*.whl")):
        unavailable(f"no torch-2.13.0+cpu wheel in {WHEEL_DIR} (set CHARRNN_TORCH_WHEELS)")
    port = free_port()
    argv = commands.argv(commands.TORCH_INDEX, wheel_dir=WHEEL_DIR, index_port=port)
    server = subprocess.Popen([sys.executable, *argv[1:]], cwd=REPO)
    try:
        wait_for(lambda: ok(f"http://127.0.0.1:{port}/simple/torch/"), 30, "the torch index", server)
        yield port
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


@pytest.fixture(scope="session")
def image(base_image: str, torch_index: int, figures: dict[str, str]) -> str:
    """The repository's Dockerfile built once per session (only its two build arguments set)."""
    template = commands.BUILD
    start = time.monotonic()
    run(
        commands.argv(template, base=base_image, index_port=torch_index, image=IMAGE),
        timeout=2400,
        cwd=REPO,
        env=os.environ | commands.env_of(template),
    )
    figures["image build"] = f"{time.monotonic() - start:.0f} s"
    return IMAGE


def ok(url: str) -> bool:
    """Whether GET `url` answers 200."""
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def wait_for(condition: Callable[[], bool], timeout: float, what: str, process=None, logs=None) -> None:
    """Poll `condition` until true; fail (with logs) after `timeout` s or if `process` exits."""

    def done() -> bool:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}")
        return condition()

    wait_until(done, timeout, lambda: what + (f"\n{logs()}" if logs else ""))


@dataclass
class Container:
    """A container started by a test, and its base URL."""

    name: str
    url: str

    def logs(self) -> str:
        """What it wrote so far, stdout and stderr in the order written (one pipe for both)."""
        argv = ["docker", "logs", self.name]
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        return result.stdout[-20000:]

    def inspect(self, template: str) -> str:
        """`docker inspect --format TEMPLATE`."""
        return docker("inspect", "--format", template, self.name).stdout.strip()

    def running(self) -> bool:
        """Whether it still runs."""
        return self.inspect("{{.State.Running}}") == "true"

    def wait_until_ready(self, timeout: float = 180) -> None:
        """Poll /health until it answers 200; fail with the logs if the container exits."""

        def ready() -> bool:
            if ok(self.url + "/health"):
                return True
            if not self.running():
                pytest.fail(f"container {self.name} exited:\n{self.logs()}")
            return False

        wait_for(ready, timeout, f"container {self.name} to answer /health", logs=self.logs)


@pytest.fixture(scope="session")
def start_container(image: str) -> Iterator[Callable[..., Container]]:
    """Runs `docker run` from a README template on a free port; removes the containers after the session."""
    names: list[str] = []

    def start(template: str, *env: str, **values: object) -> Container:
        """`env`: extra VAR=value settings for this container (before the image name)."""
        port = free_port()
        name = f"charrnn-test-{os.getpid()}-{len(names)}"
        names.append(name)
        argv = commands.argv(template, name=name, port=port, image=image, **values)
        for setting in env:
            argv[-1:-1] = ["-e", setting]
        docker(*argv[1:])
        container = Container(name, f"http://127.0.0.1:{port}")
        container.wait_until_ready()
        return container

    yield start
    for name in names:
        docker("rm", "-f", "-v", name, check=False)  # -v: its anonymous /models and /data volumes too


@pytest.fixture(scope="session")
def words_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory readable by the image's user, holding words.txt, a small generated text."""
    texts = tmp_path_factory.mktemp("texts")
    (texts / "words.txt").write_text(make_text(20_000), encoding="utf-8")
    for path in (texts, texts / "words.txt"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return texts


@dataclass
class Compose:
    """docker-compose on the repository's docker-compose.yml, as its own project."""

    project: str
    env: dict[str, str]

    def __call__(self, template: str, timeout: float = 600, check: bool = True, **values: object):
        """Run a README compose command (with -p PROJECT) in the repository."""
        argv = commands.argv(template, **values)
        return run([argv[0], "-p", self.project, *argv[1:]], timeout=timeout, check=check, cwd=REPO, env=self.env)


@pytest.fixture
def compose(image: str) -> Iterator[Compose]:
    """The compose project of one test, with its volumes removed afterwards."""
    if shutil.which("docker-compose") is None:
        unavailable("no `docker-compose` (Debian: apt-get install docker-compose)")
    port = free_port()
    env = os.environ | {"CHARRNN_IMAGE": image, "CHARRNN_SERVE_PORT": str(port)}
    project = Compose(f"charrnn-test-{os.getpid()}", env)
    yield project
    run(["docker-compose", "-p", project.project, "down", "-v", "-t", "1"], check=False, cwd=REPO, env=env)
