"""`charrnn serve`: run the service under Gunicorn with service/gunicorn.conf.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from service.app import HOW_TO_POINT
from service.config import ConfigError, describe, load_config
from service.loading import find_checkpoints

GUNICORN_CONF = Path(__file__).resolve().with_name("gunicorn.conf.py")
APP = "service.app:create_app()"


def gunicorn_command() -> list[str]:
    """The command line that runs the service (the Dockerfile runs the same one)."""
    return [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), APP]


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
    command = gunicorn_command()
    os.execve(command[0], command, env)
    return 0  # not reached: execve replaces the process


def check_model_dir(model_dir: Path) -> None:
    """Fail early, before Gunicorn starts, when the model directory holds no checkpoints."""
    if not model_dir.is_dir():
        raise ValueError(f"the model directory {model_dir} does not exist. {HOW_TO_POINT}")
    if not find_checkpoints(model_dir):
        raise ValueError(f"no checkpoints in the model directory {model_dir}. {HOW_TO_POINT}")
