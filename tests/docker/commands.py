"""The commands the docker tier runs, as the README's "Docker" section shows them.

Each is a template: the tests fill in a free port, their own names and paths; filled in with the README's
values (`README_VALUES`) each must appear in that section word for word (tests/test_dockerfile.py).
"""

from __future__ import annotations

import shlex

BUILD_BASE = "bash tests/docker/build_base.sh {base}"
TORCH_INDEX = "python3 tests/docker/torch_index.py {wheel_dir} {index_port}"
BUILD = (
    "DOCKER_BUILDKIT=0 docker build --network host --build-arg PYTHON_IMAGE={base}"
    " --build-arg TORCH_INDEX_URL=http://127.0.0.1:{index_port}/simple -t {image} ."
)
RUN_DEFAULT = "docker run -d --name {name} -p 127.0.0.1:{port}:8000 --read-only --tmpfs /tmp {image}"
RUN_MODELS = (
    "docker run -d --name {name} -p 127.0.0.1:{port}:8000 --read-only --tmpfs /tmp"
    " -v {models}:/models:ro -e CHARRNN_MODEL_DIR=/models {image}"
)
STOP = "docker stop -t 40 {name}"
COMPOSE_TRAIN = (
    "docker-compose run --rm -v {texts}:/texts:ro train"
    " charrnn train --corpus /texts/words.txt --out /models/words --preset tiny --no-progress"
)
COMPOSE_UP = "docker-compose up -d --no-build serve"
COMPOSE_STOP = "docker-compose stop serve"
# Two replicas behind the proxy, and their updates that lose no request: after a new image (`up` replaces what
# changed), and with the same image (`--force-recreate`, the replicas only: a recreated proxy refuses connections).
COMPOSE_PROXY_UP = "docker-compose --profile proxy up -d --no-build"
COMPOSE_RECREATE = "docker-compose --profile proxy up -d --no-build --force-recreate serve serve-2"

# What the README writes where a test uses its own port, names and temporary paths.
README_VALUES = {
    "base": "charrnn-base:bookworm",
    "wheel_dir": "/opt/wheels",
    "index_port": "8765",
    "image": "charrnn",
    "name": "charrnn",
    "port": "8000",
    "models": '"$PWD/runs"',
    "texts": '"$PWD/texts"',
}

ALL = (
    BUILD_BASE,
    TORCH_INDEX,
    BUILD,
    RUN_DEFAULT,
    RUN_MODELS,
    STOP,
    COMPOSE_TRAIN,
    COMPOSE_UP,
    COMPOSE_STOP,
    COMPOSE_PROXY_UP,
    COMPOSE_RECREATE,
)


def argv(template: str, **values: object) -> list[str]:
    """The command as an argument list, its leading VAR=value assignments dropped (pass them as env)."""
    words = shlex.split(template.format(**values))
    while words and "=" in words[0] and not words[0].startswith("-"):
        words.pop(0)
    return words


def env_of(template: str) -> dict[str, str]:
    """The leading VAR=value assignments of a command."""
    assignments = {}
    for word in shlex.split(template):
        if "=" not in word or word.startswith("-"):
            break
        key, _, value = word.partition("=")
        assignments[key] = value
    return assignments
