"""The Flask app factory. Gunicorn runs `charrnn.service.web.app:create_app()` once in every worker, after fork.

create_app reads the configuration (defaults, then CHARRNN_* environment variables, then the test
mapping; service/config.py), configures logging when no entry point has (service/web/logs.py), loads
every checkpoint of the model directory, starts the generation engine and the watcher that reloads the
model directory when it changes (service/engine/reloading.py), and registers the request ids,
the checks every request passes, the error handler and the blueprints. Importing this module does
nothing else.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from flask import Flask
from flask.json.provider import DefaultJSONProvider

from charrnn.service.config import ServiceConfig, load_config
from charrnn.service.engine.loading import ModelEntry, find_checkpoints, load_models
from charrnn.service.engine.reloading import ModelDirectory, Watcher
from charrnn.service.engine.scheduler import Engine
from charrnn.service.web.auth import require_api_keys
from charrnn.service.web.cors import enable_cors
from charrnn.service.web.errors import register_error_handlers
from charrnn.service.web.logs import configure_logging
from charrnn.service.web.metrics import Metrics, instrument
from charrnn.service.web.request_id import init_request_ids
from charrnn.service.web.request_threads import init_request_threads
from charrnn.service.web.routes import register_blueprints
from charrnn.service.web.slots import init_slots
from charrnn.service.web.state import Service, default_model
from charrnn.service.web.web_security import add_security_headers, check_hosts

log = logging.getLogger(__name__)

HOW_TO_POINT = (
    "Point CHARRNN_MODEL_DIR (or `charrnn serve --model-dir DIR`) at a directory holding checkpoints: "
    "NAME.safetensors files, or run directories with best.safetensors such as `charrnn train --out DIR` writes."
)


class StartupError(RuntimeError):
    """The service cannot start; the message says why and what to do."""


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON, but never NaN or Infinity (not JSON: browsers' JSON.parse refuses them).

    The last line of defence (checkpoints are validated when loaded): a non-finite float is answered
    as null, and logged, rather than as a body no client can parse.
    """

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        """`obj` as JSON, non-finite floats as null."""
        try:
            return super().dumps(obj, allow_nan=False, **kwargs)
        except ValueError:
            log.error("a response held NaN or Infinity; answered as null")
            return super().dumps(_finite_or_null(obj), allow_nan=False, **kwargs)


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(v) for v in obj]
    return obj


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: configuration, logging, models, engine, request ids, metrics, checks, error handler,
    blueprints."""
    config = load_config(overrides=test_config)
    configure_logging(config)  # under Gunicorn, its configuration has done it (service/web/gunicorn_conf.py)
    app = Flask(__name__)
    app.json = StrictJSONProvider(app)
    app.config.update(MAX_CONTENT_LENGTH=config.max_body_bytes)
    app.config.update({k: v for k, v in (test_config or {}).items() if k.upper() == k})
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    entries = _load_entries(config)
    loaded = {e.name: e.loaded for e in entries if e.loaded is not None}
    engine = Engine(
        loaded,
        max_batch=config.max_batch,
        max_queue=config.max_queue,
        batching=config.batching,
        prompt_cache_bytes=config.prompt_cache_bytes,
        native=config.native,
        kernel_dir=config.kernel_dir,
        precision=config.precision,
    )
    directory = ModelDirectory(config.model_dir, entries, engine)
    service = Service(config, directory, engine, _metrics(engine, directory))
    _check_default(config, loaded)
    app.extensions["charrnn"] = service
    init_request_ids(app)  # first: whatever refuses the request below answers (and logs) with its id
    init_request_threads(app, config.request_threads_yield)
    instrument(app, service.metrics)
    add_security_headers(app)
    check_hosts(app, config)  # before the key check: a refused Host gets 400, not 401
    enable_cors(app, config)  # before the key check: browsers send no key with a preflight
    require_api_keys(app, config.api_keys)
    register_error_handlers(app)
    init_slots(app)
    register_blueprints(app)
    engine.start()
    signals = (config.reload_signal_file,) if config.reload_signal_file is not None else ()
    service.watcher = Watcher(directory, config.reload_interval, signals)
    service.watcher.start()
    log.info("serving %s (default %s) from %s", ", ".join(loaded), service.default_model, config.model_dir)
    return app


def _metrics(engine: Engine, directory: ModelDirectory) -> Metrics:
    """The app's metrics, watching `engine` and the model directory's checks."""
    metrics = Metrics()
    metrics.watch_engine(lambda: engine.queue_depth, lambda: engine.active)
    metrics.count_models(directory.entries)
    directory.listeners.append(lambda report: metrics.record_check(report, directory.entries))
    return metrics


def _load_entries(config: ServiceConfig) -> list[ModelEntry]:
    """Every checkpoint of the model directory; StartupError when none loads."""
    model_dir = config.model_dir
    if not model_dir.is_dir():
        raise StartupError(f"the model directory {model_dir} does not exist. {HOW_TO_POINT}")
    if not find_checkpoints(model_dir):
        raise StartupError(f"no checkpoints in the model directory {model_dir}. {HOW_TO_POINT}")
    entries = load_models(model_dir)
    if not any(e.loaded for e in entries):
        problems = "; ".join(f"{e.name}: {e.error}" for e in entries)
        raise StartupError(f"none of the checkpoints in {model_dir} could be loaded ({problems}). {HOW_TO_POINT}")
    return entries


def _check_default(config: ServiceConfig, loaded: dict[str, object]) -> None:
    """Say so when the configured default model is not loaded (the default then falls back: state.default_model)."""
    if config.default_model is not None and config.default_model not in loaded:
        fallback = default_model(config, loaded)  # type: ignore[arg-type]
        log.error("default model %r is not loaded; using %r instead", config.default_model, fallback)
