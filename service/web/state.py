"""The service's state: config, models, engine and metrics, kept in `app.extensions["charrnn"]`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import current_app

from charrnn.service.config import ServiceConfig
from charrnn.service.engine.loading import LoadedModel, ModelEntry
from charrnn.service.engine.reloading import ModelDirectory, Watcher
from charrnn.service.engine.scheduler import Engine
from charrnn.service.web.errors import ApiError
from charrnn.service.web.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Service:
    """Everything a request needs, kept in `app.extensions["charrnn"]`: config, models, engine, metrics.

    The models change while the service runs (hot reload, service/engine/reloading.py): read them here,
    once per request, and keep the LoadedModel a request resolved for the rest of it.
    """

    config: ServiceConfig
    directory: ModelDirectory
    engine: Engine
    metrics: Metrics
    watcher: Watcher | None = None

    @property
    def entries(self) -> list[ModelEntry]:
        """Every checkpoint of the model directory, loaded or not, as of the last check."""
        return self.directory.entries

    @property
    def default_model(self) -> str | None:
        """The model a request naming none gets now (None when no model is loaded)."""
        return default_model(self.config, self.engine.models)

    def model(self, name: str | None, field_name: str = "model") -> LoadedModel:
        """The loaded model called `name` (the default for None); 422 naming the field otherwise."""
        models = self.engine.models  # one reading: a reload may replace the dict meanwhile
        name = default_model(self.config, models) if name is None else name
        loaded = models.get(name) if name is not None else None
        if loaded is None:
            known = ", ".join(sorted(models)) or "none"
            wanted = "no model is loaded" if name is None else f"no model called {name!r} is loaded"
            raise ApiError(422, "unknown_model", f"{wanted}; known: {known}", field_name)
        return loaded

    def close(self) -> None:
        """Stop watching the model directory, let running generations finish, then stop the engine."""
        if self.watcher is not None:
            self.watcher.stop()
        self.engine.close(timeout=self.config.request_timeout)


def default_model(config: ServiceConfig, loaded: dict[str, LoadedModel]) -> str | None:
    """The configured default if it is loaded; else "default" if there is one; else the first by name."""
    if config.default_model in loaded:
        return config.default_model
    if not loaded:
        return None
    return "default" if "default" in loaded else min(loaded)


def current_service() -> Service:
    """The Service of the app answering the current request."""
    return current_app.extensions["charrnn"]
