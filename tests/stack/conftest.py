"""The stack tier (`make test-stack`): deploy/stack.yml on a one-node Docker Swarm, through `make stack-up` and
`make stack-down` (deploy/stack.sh), with the app image the docker tier builds.

The app image is built once: the docker tier's `charrnn:test` is used as it is when it exists (CI runs the
docker tier first; CHARRNN_STACK_REBUILD=1 builds it again), else it is built here as the docker tier builds
it. The proxy and Prometheus images are built from Debian's packages on the same base (cached layers).
Where a piece is missing, a developer's run skips with the reason; under CI=true it fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.docker.conftest import (  # noqa: F401 (fixtures)
    base_image,
    docker_engine,
    figures,
    image,
    pytest_configure,
    torch_index,
)
from tests.docker.tools import IMAGE, REPO, docker, run, unavailable
from tests.helpers import free_port

STACK = "charrnn-test"
REPLICAS = 3
# Short enough for the tier's time, long enough for its 300-character streams on 2 busy cores: a stopping
# replica drains 2 s, then gives streams in flight 20 s, and is killed 25 s after SIGTERM (a hung one too).
SETTINGS = {
    "CHARRNN_REPLICAS": str(REPLICAS),
    "CHARRNN_WORKERS": "1",
    "CHARRNN_REPLICA_CPUS": "1",
    "CHARRNN_REPLICA_MEMORY": "1G",
    "CHARRNN_DRAIN_SECONDS": "2",
    "CHARRNN_GRACEFUL_TIMEOUT": "20",
    "CHARRNN_STOP_GRACE_PERIOD": "25s",
}


@dataclass
class Stack:
    """The deployed stack: its name, the proxy's and Prometheus' URLs, and the environment it was made with."""

    name: str
    url: str
    prometheus: str
    env: dict[str, str]

    @property
    def app(self) -> str:
        """The app service's name."""
        return f"{self.name}_app"


@pytest.fixture(scope="session")
def app_image(request: pytest.FixtureRequest, docker_engine: None) -> str:  # noqa: F811
    """The docker tier's image where it exists (unless CHARRNN_STACK_REBUILD=1), else built as it builds it."""
    if (
        os.environ.get("CHARRNN_STACK_REBUILD") != "1"
        and docker("image", "inspect", IMAGE, check=False).returncode == 0
    ):
        return IMAGE
    return request.getfixturevalue("image")


@pytest.fixture(scope="session")
def stack(app_image: str, base_image: str) -> Iterator[Stack]:  # noqa: F811
    """`make stack-up` with 3 replicas on free proxy and Prometheus ports; `make stack-down` afterwards."""
    if os.geteuid() != 0 or shutil.which("make") is None:
        unavailable("the stack tier needs root (docker swarm) and make")
    if docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() not in ("inactive", "active"):
        unavailable("this Docker engine cannot be a Swarm node")
    if STACK in docker("stack", "ls", "--format", "{{.Name}}", check=False).stdout.split():
        pytest.fail(f"a stack named {STACK} runs already (docker stack rm {STACK})")
    proxy_port, prometheus_port = free_port(), free_port()
    env = (
        os.environ
        | SETTINGS
        | {
            "CHARRNN_STACK": STACK,
            "CHARRNN_IMAGE": app_image,
            "CHARRNN_BUILD_APP": "0",
            "DEBIAN_IMAGE": base_image,
            "CHARRNN_PROXY_PORT": str(proxy_port),
            "CHARRNN_PROMETHEUS_PORT": str(prometheus_port),
            "CHARRNN_UP_TIMEOUT": "300",
        }
    )
    try:
        run(["make", "stack-up"], timeout=900, cwd=REPO, env=env)
        yield Stack(STACK, f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{prometheus_port}", env)
    finally:
        down = run(["make", "stack-down"], timeout=300, cwd=REPO, env=env, check=False)
        print(down.stdout, down.stderr)
