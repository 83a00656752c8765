"""Log lines: Gunicorn's usual text, or one JSON object per line (CHARRNN_LOG_FORMAT=json) for log shippers.

Logging is configured once, at the entry point, from `logging_config`: Gunicorn's configuration
(service/web/gunicorn_conf.py) hands it to Gunicorn as its logconfig_dict, which covers Gunicorn's own
lines, its access log and the app's records (they propagate to the root logger); an app built outside
Gunicorn (`flask run`, another WSGI server) gets the same from create_app, unless logging is configured
already. A JSON line holds time (ISO 8601, UTC), level, logger, message, request_id ("-" outside a
request; service/web/request_id.py) and exc_info (the traceback's text) when there is one.

The access log stays Gunicorn's: it writes one line per request once the last byte is sent (or the client
has gone), with the status actually sent and the whole time taken, streams included, which the app cannot
know from an after_request hook. What only the app knows it leaves where Gunicorn's line can read it: the
request id in the `X-Request-Id` response header, and the characters generated for the request in the
WSGI environ (`count_characters`, called when a run ends, service/web/run.py). The JSON access line is
built from Gunicorn's atoms: method, path, status, duration_ms, characters, request_id. So there is one
line per request, never an app-side twin, and the text line is unchanged. One limit: Gunicorn writes
the line before it closes the response, so a stream cut short by its client is counted after its line
was written, and the line says `"characters": null` (as do requests that generate nothing).
"""

from __future__ import annotations

import json
import logging
import logging.config
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from flask import has_request_context, request

from charrnn.service.config import ServiceConfig
from charrnn.service.web.request_id import HEADER, NO_REQUEST, RequestIdFilter

CHARACTERS_KEY = "charrnn.characters"  # in the WSGI environ: characters generated for this request
# Gunicorn's atoms for a response header ({name}o) and an environ key ({key}e), names in lower case
ID_ATOM = "{" + HEADER.lower() + "}o"
CHARACTERS_ATOM = "{" + CHARACTERS_KEY + "}e"
# Gunicorn's own text format (its CONFIG_DEFAULTS), kept for the text lines so that they look as they always have
TEXT_FORMAT = {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(message)s", "datefmt": "[%Y-%m-%d %H:%M:%S %z]"}


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: time, level, logger, message, request_id, exc_info when any."""

    def format(self, record: logging.LogRecord) -> str:
        """The JSON line (ASCII: a newline in a message or traceback is escaped, never a line break)."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", NO_REQUEST),
        }
        entry |= self.fields(record)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """What a kind of record adds to (or corrects in) the common fields; nothing by default."""
        return {}


class AccessJsonFormatter(JsonFormatter):
    """Gunicorn's access line as JSON, from the atoms it logs with (its record's args)."""

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """method, path, status, duration_ms, characters (None: not known), and the response's request id."""
        atoms = record.args if isinstance(record.args, Mapping) else {}
        micros = atoms.get("D")
        return {
            "request_id": atoms.get(ID_ATOM) or NO_REQUEST,
            "method": atoms.get("m"),
            "path": atoms.get("U"),
            "status": _status(atoms.get("s")),
            "duration_ms": round(micros / 1000, 3) if isinstance(micros, int) else None,
            "characters": atoms.get(CHARACTERS_ATOM),
        }


def _status(value: Any) -> int | None:
    """Gunicorn's status atom ("200" or 200) as a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """The dictConfig for Gunicorn's loggers and the app's: `text` or `json` lines, at `level` (Gunicorn's names).

    Access lines go to stdout, everything else to stderr, as Gunicorn does by default; every record passes
    RequestIdFilter, which labels it with the request being handled.
    """
    json_lines = log_format == "json"
    level = level.upper()

    def handler(stream: str, formatter: str) -> dict[str, Any]:
        return {"class": "logging.StreamHandler", "stream": stream, "formatter": formatter, "filters": ["request_id"]}

    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {
            "generic": {"()": JsonFormatter} if json_lines else dict(TEXT_FORMAT),
            "access": {"()": AccessJsonFormatter} if json_lines else dict(TEXT_FORMAT),
        },
        "handlers": {
            "console": handler("ext://sys.stdout", "access"),
            "error_console": handler("ext://sys.stderr", "generic"),
        },
        "root": {"level": level, "handlers": ["error_console"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["error_console"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        },
    }


def configure_logging(config: ServiceConfig) -> bool:
    """Configure logging from `config` unless something has (Gunicorn, a test runner, an embedding program):
    the root logger has handlers then. Whether it configured."""
    if logging.getLogger().handlers:
        return False
    logging.config.dictConfig(logging_config(config.log_format, config.log_level))
    return True


def count_characters(count: int) -> None:
    """Add `count` to the characters generated for the request being answered (its access line reads them)."""
    if has_request_context():
        request.environ[CHARACTERS_KEY] = request.environ.get(CHARACTERS_KEY, 0) + count
