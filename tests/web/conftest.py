"""Fixtures for the service tests: apps built by `create_app` over the session's tiny model (`model_dir`,
in tests/conftest.py, with the real Gunicorn servers), and Flask's test client for them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from charrnn.service.web.app import create_app


@pytest.fixture
def make_app(model_dir: Path) -> Iterator[Callable[..., Flask]]:
    """Builds apps over `model_dir` with config overrides; their engines are closed afterwards."""
    apps: list[Flask] = []

    def build(**overrides: object) -> Flask:
        app = create_app({"MODEL_DIR": model_dir, "TESTING": True, **overrides})
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["charrnn"].close()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    """The app with the default configuration, serving the tiny model."""
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Flask's test client for `app`."""
    return app.test_client()
