"""`charrnn serve`: run the service under Gunicorn with its config module, charrnn.service.web.gunicorn_conf."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import charrnn
from charrnn.service.config import ConfigError, ServiceConfig, describe, load_config, variable
from charrnn.service.engine.loading import find_checkpoints
from charrnn.service.web.app import HOW_TO_POINT

# A module, not a file: Gunicorn imports it from wherever the package is installed (`-c python:MODULE`).
GUNICORN_CONF = "python:charrnn.service.web.gunicorn_conf"
APP = "charrnn.service.web.app:create_app()"
# The directory the `charrnn` package is imported from (site-packages, or the checkout of an editable install).
# Gunicorn (and `python -m`) put the working directory first on sys.path, where a user's own charrnn.py or
# flask.py would be imported instead of the real ones: Gunicorn starts here, where only installed code is.
PACKAGE_ROOT = Path(charrnn.__file__).resolve().parents[1]
# Paths read from the environment outside the settings object, relative to the caller's directory too.
OTHER_PATH_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR",)


def gunicorn_command() -> list[str]:
    """The command line that runs the service: the Dockerfile's, under this interpreter."""
    return [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF, APP]


def serve(
    model_dir: Path | None = None, host: str | None = None, port: int | None = None, workers: int | None = None
) -> int:
    """Replace this process with Gunicorn; flags left as None keep the CHARRNN_* environment or defaults."""
    settings = {"CHARRNN_MODEL_DIR": model_dir, "CHARRNN_HOST": host, "CHARRNN_PORT": port, "CHARRNN_WORKERS": workers}
    env = dict(os.environ) | {name: str(value) for name, value in settings.items() if value is not None}
    try:
        config = load_config(env)  # what Gunicorn's configuration will read: a bad value stops here
    except ConfigError as error:
        print(f"charrnn: {describe(error)}", file=sys.stderr)
        return 2
    check_model_dir(config.model_dir)
    env |= absolute_paths(config, env) | {"PWD": str(PACKAGE_ROOT)}
    command = gunicorn_command()
    os.chdir(PACKAGE_ROOT)
    os.execve(command[0], command, env)
    return 0  # not reached: execve replaces the process


def absolute_paths(config: ServiceConfig, env: Mapping[str, str]) -> dict[str, str]:
    """The path settings as absolute paths (Gunicorn runs in PACKAGE_ROOT, so `--model-dir runs` must not move)."""
    paths = {variable(f.name): getattr(config, f.name) for f in dataclasses.fields(config)}
    paths = {name: path for name, path in paths.items() if isinstance(path, Path)}
    paths |= {name: Path(env[name]) for name in OTHER_PATH_VARIABLES if env.get(name)}
    return {name: os.path.abspath(path) for name, path in paths.items()}


def check_model_dir(model_dir: Path) -> None:
    """Fail early, before Gunicorn starts, when the model directory holds no checkpoints."""
    if not model_dir.is_dir():
        raise ValueError(f"the model directory {model_dir} does not exist. {HOW_TO_POINT}")
    if not find_checkpoints(model_dir):
        raise ValueError(f"no checkpoints in the model directory {model_dir}. {HOW_TO_POINT}")
