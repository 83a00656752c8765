"""The service's settings: defaults, then CHARRNN_* environment variables, then a test mapping.

One object, `ServiceConfig`, read by `create_app` (service/web/app.py) and by Gunicorn's configuration
(service/web/gunicorn_conf.py), and `setting` for the one value the kernel loader (service/engine/lstm_kernel.py)
needs, so that a setting is parsed and checked in one place. Its environment
variable is CHARRNN_ + the field name in upper case (CHARRNN_MODEL_DIR); a test mapping uses the
upper-case field name (MODEL_DIR). A bad value is a `ConfigError` naming the variable and the allowed
range. The hard bounds below are what no setting can raise: the request schemas (service/web/schemas.py)
and the OpenAPI document (service/web/openapi.py) take them from here.
"""

from __future__ import annotations

import functools
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charrnn.model.config import MAX_LAYERS, ConfigError

__all__ = ["Bounds", "ConfigError", "ServiceConfig", "bounds", "load_config", "setting"]

ENV_PREFIX = "CHARRNN_"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"

# -- hard bounds: the most any request may ask for, whatever the settings ------------------------------
MAX_SAMPLES = 16  # samples per request (`n`); CHARRNN_MAX_N may lower it, not raise it
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_LAYER_INDEX = MAX_LAYERS - 1  # /inspect's `layer`: the model's layers are 0 .. MAX_LAYERS - 1
MAX_STOP_STRINGS = 4  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string
TOP_LOGPROBS = 5  # alternatives per character a request may ask for
DEFAULT_MAX_BATCH = 64  # generations stepped together (and, by default, Gunicorn threads per worker)
DEFAULT_MAX_QUEUE = 256  # generations waiting for a batch slot
DEFAULT_PROMPT_CACHE_BYTES = 64 << 20  # recurrent states of recently seen prompts
KERNEL_PRECISIONS = (
    "auto",
    "int8",
    "bf16",
    "fp32",
)  # the serving kernel's arithmetic (ServiceConfig.precision, service/engine/batch.precision_flags), not training's
# the C kernel's builds (service/engine/lstm_kernel.py VARIANTS), fastest first; "auto": the best this CPU passes
KERNEL_BUILDS = ("auto", "amx", "bf16", "avx2", "portable")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")  # text: Gunicorn's usual lines; json: one object per line (service/web/logs.py)
# A browser origin: scheme://host[:port], no path (what a browser sends in its Origin header)
ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Bounds:
    """The values a setting allows: `low` <= value (or < when `strict`) <= `high`, or one of `choices`."""

    low: float | None = None
    high: float | None = None
    strict: bool = False
    choices: tuple[str, ...] = ()

    def allows(self, value: Any) -> bool:
        """Whether `value` (already of the setting's type) is within these bounds."""
        if self.choices:
            return value in self.choices
        if self.low is not None and (value <= self.low if self.strict else value < self.low):
            return False
        return self.high is None or value <= self.high

    def text(self) -> str:
        """The bounds as the end of a sentence: ' >= 1', ' between 1 and 16', ' > 0'."""
        if self.low is not None and self.high is not None:
            return f" between {self.low} and {self.high}"
        if self.low is not None:
            return f" {'>' if self.strict else '>='} {self.low}"
        return ""


def _setting(default: Any, low: float | None = None, high: float | None = None, **kwargs: Any) -> Any:
    """A dataclass field with its allowed values (`Bounds`) as metadata."""
    return field(default=default, metadata={"bounds": Bounds(low, high, **kwargs)})


@dataclass(frozen=True)
class ServiceConfig:
    """What the HTTP service and its Gunicorn master read at start-up. docs/CONFIGURATION.md lists these."""

    model_dir: Path = DEFAULT_MODEL_DIR  # checkpoints to serve: *.safetensors, and run directories' best
    default_model: str | None = None  # served when a request names none; None: "default" if loaded, else first
    api_keys: tuple[str, ...] = ()  # accepted bearer keys; empty: no authentication
    max_body_bytes: int = _setting(64 * 1024, 1)  # larger request bodies get 413 before they are parsed
    max_prompt_chars: int = _setting(16_384, 1)
    # the largest `max_new_chars` (and /v1 `max_tokens`) a request may ask for
    max_new_chars: int = _setting(2_000, 1)
    max_n: int = _setting(MAX_SAMPLES, 1, MAX_SAMPLES)  # the most samples one request may ask for (/v1: prompts x n)
    # The most characters one request may ask for over all its samples (samples x max_new_chars), never
    # below max_new_chars; None: max_n x max_new_chars.
    max_request_chars: int | None = _setting(None, 1)
    # The most logprob alternatives one answer may hold (characters x alternatives per character), never
    # below one sample of max_new_chars characters with TOP_LOGPROBS alternatives.
    max_request_logprobs: int = _setting(40_000, 1)
    # Generations (queued + running) one client (its API key; without keys, its address) may hold in a
    # worker; beyond them 429. None: a quarter of max_batch; 0: no limit.
    max_client_jobs: int | None = _setting(None, 0)
    # Without keys, tell clients apart by the last X-Forwarded-For address (the one a proxy in front
    # appended) instead of the connection's: only when every request comes through that proxy.
    trust_forwarded_for: bool = False
    max_inspect_chars: int = _setting(2_000, 1)  # the longest text POST /inspect reads
    # The most activations one /inspect answer holds (characters x the model's cells): 2,000 characters
    # of the default model (512 cells); its JSON is about 6 bytes a value
    max_inspect_values: int = _setting(1 << 20, 1)
    max_batch: int = _setting(DEFAULT_MAX_BATCH, 1)  # generations stepped together by the engine
    max_queue: int = _setting(DEFAULT_MAX_QUEUE, 1)  # generations waiting for a batch slot; beyond this, 429
    batching: bool = True  # step concurrent generations as one batch
    # request threads run under SCHED_BATCH (Linux): on waking they do not preempt the engine's threads
    # (service/web/request_threads.py)
    request_threads_yield: bool = True
    # memory for the recurrent states of recently seen prompts (0: off)
    prompt_cache_bytes: int = _setting(DEFAULT_PROMPT_CACHE_BYTES, 0)
    # seconds a generation may run; then it ends with finish_reason "deadline"
    request_timeout: float = _setting(300.0, 0, strict=True)
    health_timeout: float = _setting(10.0, 0, strict=True)  # seconds /health waits for its one-character generation
    # torch intra-op threads per worker; None: the cores this process may use, shared between the workers
    torch_threads: int | None = _setting(None, 1)
    native: bool = True  # step LSTM batches with the C kernel where it can be built (false: PyTorch only)
    kernel_dir: Path | None = None  # where compiled kernels are kept; None: ~/.cache/charrnn/kernels
    # the kernel's arithmetic: auto (int8 in the AMX, AVX512-BF16 and AVX2 builds, the same bits in each;
    # float32 in the portable one), int8, bf16 or fp32 (batch.precision_flags)
    precision: str = _setting("auto", choices=KERNEL_PRECISIONS)
    # which build of the kernel: auto (the best this CPU runs and that passes its check), or one by name
    kernel_build: str = _setting("auto", choices=KERNEL_BUILDS)
    # Hot reload (docs/SERVICE.md): seconds between two polls of the model directory for checkpoints added,
    # replaced or removed; inotify events start a check at once where the kernel sends them
    reload_interval: float = _setting(2.0, 0, 10, strict=True)
    # A file whose every change asks this worker to check the model directory. Gunicorn's configuration makes
    # one for its workers (service/web/gunicorn_conf.py); POST /admin/reload and SIGHUP to the master rewrite it.
    reload_signal_file: Path | None = None
    docs: bool = True  # serve the API docs page at /docs
    playground: bool = True  # serve the playground page at /
    # -- read by Gunicorn's master (service/web/gunicorn_conf.py) --
    host: str = "127.0.0.1"  # the address to listen on; not reachable from the network by default
    port: int = _setting(8000, 0, 65535)  # the port to listen on (0: any free one)
    # worker processes, each with its own models and engine; None: 2 where this process may use 2 cores or
    # more, else 1 (two GILs share the HTTP work: docs/BENCHMARKS.md, `bench/throughput.py --workers 1 2`)
    workers: int | None = _setting(None, 1)
    threads: int | None = _setting(None, 1)  # concurrent requests (streams included) per worker; None: max_batch
    worker_timeout: int = _setting(60, 0)  # seconds a silent worker lives before it is replaced (0: never)
    graceful_timeout: int = _setting(30, 0)  # seconds workers get after SIGTERM to finish what is in flight
    # seconds /health answers 503 after SIGTERM, still serving, before the graceful stop begins (a load
    # balancer polling /health drops the replica first; service/web/drain.py)
    drain_seconds: float = _setting(0.0, 0, 600)
    max_requests: int = _setting(0, 0)  # restart a worker after this many requests (0: never)
    log_level: str = _setting("info", choices=LOG_LEVELS)  # Gunicorn's and the app's log level
    log_format: str = _setting("text", choices=LOG_FORMATS)  # Gunicorn's and the app's log lines: text or json
    # Host header names answered, comma-separated (".example.com": and its subdomains; "*": any); empty:
    # loopback names when `host` is a loopback address, else any (service/web/web_security.py says why)
    allowed_hosts: tuple[str, ...] = ()
    # Browser origins (scheme://host[:port]) whose pages may call the API, comma-separated; "*" alone: any
    # (a public API); empty: none, browsers keep other sites' pages out (service/web/cors.py)
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, kind in _types().items():
            _check(name, kind, getattr(self, name))
        if any(not key for key in self.api_keys):
            raise ConfigError(variable("api_keys"), "must not contain empty keys")
        _check_origins(self.cors_origins)

    @property
    def request_char_limit(self) -> int:
        """The characters one request may ask for, over all its samples."""
        if self.max_request_chars is None:
            return self.max_n * self.max_new_chars
        return max(self.max_request_chars, self.max_new_chars)

    def request_logprob_limit(self, top_logprobs: int) -> int:
        """The logprob alternatives one answer may hold, where a character has at most `top_logprobs`."""
        return max(self.max_request_logprobs, self.max_new_chars * top_logprobs)

    @property
    def client_job_limit(self) -> int | None:
        """Generations (queued + running) one client may hold in this worker; None: no limit."""
        if self.max_client_jobs is None:
            return max(1, self.max_batch // 4)
        return self.max_client_jobs or None

    @property
    def thread_count(self) -> int:
        """Gunicorn threads per worker: as many as a batch has rows unless set, so that requests can fill it."""
        return self.threads if self.threads is not None else self.max_batch

    @property
    def bind(self) -> str:
        """The address Gunicorn listens on, as host:port."""
        return f"{self.host}:{self.port}"


def variable(name: str) -> str:
    """The environment variable of the setting `name`: CHARRNN_MAX_N for max_n."""
    return ENV_PREFIX + name.upper()


def describe(error: ConfigError) -> str:
    """A bad setting as one sentence: 'CHARRNN_WORKERS must be an integer >= 1, got 'x''."""
    return f"{error.field} {error.message}"


def load_config(environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> ServiceConfig:
    """Defaults, then CHARRNN_* variables from `environ`, then `overrides` (upper-case field names)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    kinds = _types()
    for name, kind in kinds.items():
        text = environ.get(variable(name))
        if text is not None and text.strip() != "":
            values[name] = _parse(name, kind, text.strip())
    for key, value in (overrides or {}).items():
        name = key.lower()
        if name in kinds:
            values[name] = _parse(name, kinds[name], value) if isinstance(value, str) else _listed(value)
    return ServiceConfig(**values)


def setting(name: str, environ: Mapping[str, str] | None = None, text: str | None = None) -> Any:
    """One setting, parsed and checked as `load_config` does: `text` if given, else its variable in
    `environ` (os.environ), else its default. For readers that need one value, not the whole service's
    (the kernel loader): an unrelated bad variable is then not their error."""
    kind = _types()[name]
    if text is None:
        text = (os.environ if environ is None else environ).get(variable(name))
    if text is None or text.strip() == "":
        return ServiceConfig.__dataclass_fields__[name].default
    value = _parse(name, kind, text.strip())
    _check(name, kind, value)
    return value


def _check_origins(origins: tuple[str, ...]) -> None:
    """Raise ConfigError unless every origin is scheme://host[:port], or the list is "*" alone."""
    if origins == ("*",):
        return
    for origin in origins:
        if origin == "*":
            raise ConfigError(variable("cors_origins"), "must be * alone (any origin) or a list of origins, not both")
        if not _is_origin(origin):
            what = "origins like https://example.org (scheme://host[:port], no path) or * alone"
            raise ConfigError(variable("cors_origins"), f"must be {what}, got {origin!r}")


def _is_origin(text: str) -> bool:
    """Whether `text` is an origin as browsers send it: scheme://host or scheme://host:port (1-65535)."""
    match = ORIGIN.fullmatch(text)
    return match is not None and (match.group(3) is None or 0 < int(match.group(3)[1:]) <= 65535)


def _listed(value: Any) -> Any:
    """A test mapping's list stands for a tuple."""
    return tuple(value) if isinstance(value, list) else value


@functools.cache
def _types() -> dict[str, Any]:
    """Each field's type, with `X | None` reduced to X (None is always allowed where it is the default)."""
    return {name: _base(kind) for name, kind in typing.get_type_hints(ServiceConfig).items()}


def _base(kind: Any) -> Any:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (kind,) = (arg for arg in typing.get_args(kind) if arg is not type(None))
    return typing.get_origin(kind) or kind


def bounds(name: str) -> Bounds:
    """The values the setting `name` allows (`charrnn serve`'s flags check theirs with these)."""
    return ServiceConfig.__dataclass_fields__[name].metadata.get("bounds", Bounds())


def _what(name: str, kind: Any) -> str:
    """What a setting must be, as a sentence says it: 'an integer >= 1'."""
    allowed = bounds(name)
    if allowed.choices:
        return f"one of {', '.join(allowed.choices)}"
    what = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "text")
    return what + allowed.text()


def _parse(name: str, kind: Any, text: str) -> Any:
    """The value of one environment variable (or a test mapping's string), converted to its field's type."""
    try:
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError(text)
            return text.lower() in _TRUE
        if kind is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is Path:
            return Path(text)
        return text.lower() if bounds(name).choices else text
    except ValueError:
        raise ConfigError(variable(name), f"must be {_what(name, kind)}, got {text!r}") from None


def _check(name: str, kind: Any, value: Any) -> None:
    """Raise ConfigError unless `value` has the field's type and is within its bounds (None: the default)."""
    if value is None and ServiceConfig.__dataclass_fields__[name].default is None:
        return
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok or not bounds(name).allows(value):
        raise ConfigError(variable(name), f"must be {_what(name, kind)}, got {value!r}")
