"""docker-compose.yml's two replicas behind its proxy, updated under load as the README says: after a new image
(`up`), and with the same one (`up --force-recreate serve serve-2`). No request may fail; the figures are printed.

Compose replaces `serve`, waits until the new one is healthy, then replaces `serve-2`; the proxy stops sending
to a replica whose /health fails (draining, stopped, loading) and retries on the other what got no byte.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import requests

from tests.docker import commands
from tests.docker.tools import BASE, REPO, Compose, docker, run, wait_for
from tests.helpers import free_port
from tests.stack.load import Load, Outcome, p99

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

SERVICES = ("serve", "serve-2", "proxy")
SETTLE_SECONDS = 8  # load before and after each change
# The default model (its vocabulary has the load's prompts, ROMEO: and JULIET:), copied into the models volume.
COPY_DEFAULT_MODEL = (
    "docker-compose run --rm --no-deps --entrypoint sh train -c"
    ' \'cp "$(python -P -c "from charrnn.service.config import DEFAULT_MODEL_DIR as d; print(d)")"/*.safetensors'
    " /models/'"
)


@pytest.fixture
def proxied(compose: Compose, image: str) -> Iterator[tuple[Compose, str]]:
    """The compose project with its proxy (built from deploy/proxy on the stand-in base) and an image tag of
    its own, which the test may point at a new image; the proxy's URL."""
    own_image = f"charrnn:compose-{os.getpid()}"
    proxy_image = f"charrnn-proxy:compose-{os.getpid()}"
    docker("tag", image, own_image)
    build = ["docker", "build", "-q", "--network", "host", "--build-arg", f"DEBIAN_IMAGE={BASE}"]
    run([*build, "-f", "deploy/proxy/Dockerfile", "-t", proxy_image, "deploy"], timeout=900, cwd=REPO,
        env=os.environ | {"DOCKER_BUILDKIT": "0"})  # fmt: skip
    port = free_port()
    compose.env.update(CHARRNN_IMAGE=own_image, CHARRNN_PROXY_IMAGE=proxy_image, CHARRNN_PROXY_PUBLISH_PORT=str(port))
    try:
        yield compose, f"http://127.0.0.1:{port}"
    finally:
        run(["docker-compose", "-p", compose.project, "--profile", "proxy", "down", "-v", "-t", "1"], check=False,
            cwd=REPO, env=compose.env)  # fmt: skip
        docker("rmi", own_image, proxy_image, check=False)


def containers(compose: Compose) -> dict[str, str]:
    """Each service's container id."""
    return {
        name: docker("inspect", "--format", "{{.Id}}", f"{compose.project}_{name}_1").stdout.strip()
        for name in SERVICES
    }


def all_healthy(compose: Compose, url: str) -> bool:
    """Both replicas healthy (Docker's check) and the proxy answering /health."""
    for name in SERVICES[:2]:
        state = docker("inspect", "--format", "{{.State.Health.Status}}", f"{compose.project}_{name}_1", check=False)
        if state.stdout.strip() != "healthy":
            return False
    try:
        return requests.get(url + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def report(phase: str, outcomes: list[Outcome], seconds: float | None = None) -> str:
    """One line of figures: requests sent, failed, p99 to the first character."""
    mine = [o for o in outcomes if o.phase == phase]
    failed = [o for o in mine if o.error]
    first = p99([o.first_char for o in mine if o.first_char is not None])
    took = f" ({seconds:.1f} s)" if seconds is not None else ""
    p99_text = f"{first * 1000:.0f} ms" if first is not None else "none"
    return f"{phase}{took}: {len(mine)} sent, {len(failed)} failed, p99 first character {p99_text}"


def test_updating_the_two_replicas_under_load_fails_no_request(proxied: tuple[Compose, str], capsys) -> None:
    compose, url = proxied
    compose(COPY_DEFAULT_MODEL)
    compose(commands.COMPOSE_PROXY_UP)
    wait_for(lambda: all_healthy(compose, url), 300, "both replicas healthy and the proxy answering")
    own_image = compose.env["CHARRNN_IMAGE"]
    load = Load(url).start()
    took: dict[str, float] = {}
    try:
        time.sleep(SETTLE_SECONDS)
        for phase in ("recreate", "new image"):
            before = containers(compose)
            if phase == "new image":  # what a rebuild gives: another image under the same tag
                label = f"LABEL charrnn.test.rebuilt={time.time_ns()}"
                run(["docker", "build", "-q", "-t", own_image, "-"], input=f"FROM {own_image}\n{label}\n",
                    env=os.environ | {"DOCKER_BUILDKIT": "0"})  # fmt: skip
            load.phase = phase
            start = time.monotonic()
            compose(commands.COMPOSE_RECREATE if phase == "recreate" else commands.COMPOSE_PROXY_UP, timeout=300)
            took[phase] = time.monotonic() - start
            after = containers(compose)
            assert after["serve"] != before["serve"] and after["serve-2"] != before["serve-2"], phase
            assert after["proxy"] == before["proxy"], f"{phase} recreated the proxy"
            load.phase = f"after {phase}"
            wait_for(lambda: all_healthy(compose, url), 300, "both replicas healthy again")
            time.sleep(SETTLE_SECONDS)
    finally:
        outcomes = load.stop()
    with capsys.disabled():
        print()
        for phase in ("before", "recreate", "after recreate", "new image", "after new image"):
            print("compose update:", report(phase, outcomes, took.get(phase)))
    failed = [o for o in outcomes if o.error]
    assert not failed, [f"{o.phase} {o.kind}: {o.error}" for o in failed[:10]]
    assert all(any(o.phase == phase for o in outcomes) for phase in ("recreate", "new image"))
