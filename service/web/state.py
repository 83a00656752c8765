"""The service's state: config, models, engine and metrics, kept in `app.extensions["charrnn"]`."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from charrnn.service.config import ServiceConfig
from charrnn.service.engine.loading import LoadedModel, ModelEntry
from charrnn.service.engine.scheduler import Engine
from charrnn.service.web.errors import ApiError
from charrnn.service.web.metrics import Metrics


@dataclass
class Service:
    """Everything a request needs, kept in `app.extensions["charrnn"]`: config, models, engine, metrics."""

    config: ServiceConfig
    entries: list[ModelEntry]
    engine: Engine
    metrics: Metrics
    default_model: str

    def model(self, name: str | None, field_name: str = "model") -> LoadedModel:
        """The loaded model called `name` (the default for None); 422 naming the field otherwise."""
        name = self.default_model if name is None else name
        loaded = self.engine.models.get(name)
        if loaded is None:
            known = ", ".join(sorted(self.engine.models))
            raise ApiError(422, "unknown_model", f"no model called {name!r} is loaded; known: {known}", field_name)
        return loaded

    def close(self) -> None:
        """Let running generations finish, then stop the engine."""
        self.engine.close(timeout=self.config.request_timeout)


def current_service() -> Service:
    """The Service of the app answering the current request."""
    return current_app.extensions["charrnn"]
