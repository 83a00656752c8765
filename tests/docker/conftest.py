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
from pathlib import Path

import pytest

from tests.docker import commands
from tests.docker.tools import BASE, IMAGE, REPO, WHEEL_DIR, Compose, Container, docker, ok, run, unavailable, wait_for
from tests.helpers import free_port, make_word_text

# What the tier measured (build time, image size), reported at the end of the session.
FIGURES = pytest.StashKey[dict]()


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


@pytest.fixture(scope="session")
def default_bridge(docker_engine: None) -> None:
    """The engine's default bridge network, through which `docker run -p` publishes a port. An engine started
    with --bridge=none has none: its containers start, but their ports never answer (the stack tier, on the
    host's network, does not need it)."""
    if run(["docker", "network", "inspect", "bridge"], check=False).returncode != 0:
        unavailable(
            "the Docker engine has no default bridge network (dockerd --bridge=none?), so `docker run -p` cannot"
            " publish a port; start dockerd without --bridge=none, as .ci/run does"
        )


@pytest.fixture(scope="session")
def start_container(image: str, default_bridge: None) -> Iterator[Callable[..., Container]]:
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
    (texts / "words.txt").write_text(make_word_text(20_000), encoding="utf-8")
    for path in (texts, texts / "words.txt"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return texts


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
