"""The docker tier's plain helpers, for its conftest and its test modules: running commands (a failure
shows their output), skipping or failing where a piece is missing (a failure in CI), waiting for a
container, the compose project."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.docker import commands
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"
BASE = "charrnn-base:bookworm"
IMAGE = "charrnn:test"
WHEEL_DIR = Path(os.environ.get("CHARRNN_TORCH_WHEELS", "/opt/wheels"))


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


@dataclass
class Compose:
    """docker-compose on the repository's docker-compose.yml, as its own project."""

    project: str
    env: dict[str, str]

    def __call__(self, template: str, timeout: float = 600, check: bool = True, **values: object):
        """Run a README compose command (with -p PROJECT) in the repository."""
        argv = commands.argv(template, **values)
        return run([argv[0], "-p", self.project, *argv[1:]], timeout=timeout, check=check, cwd=REPO, env=self.env)
