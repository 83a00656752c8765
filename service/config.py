"""The service's configuration: defaults, then CHARRNN_* environment variables, then a test mapping.

Every setting is a field of `ServiceConfig`; its environment variable is CHARRNN_ + the field name in
upper case (CHARRNN_MODEL_DIR), and a test mapping uses the upper-case field name (MODEL_DIR).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "CHARRNN_"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


class ConfigError(ValueError):
    """A setting has a value the service cannot use; the message names the setting."""


@dataclass(frozen=True)
class ServiceConfig:
    """What the HTTP service reads at start-up. The README's configuration table lists these."""

    model_dir: Path = DEFAULT_MODEL_DIR  # checkpoints to serve: *.safetensors and */best.safetensors
    default_model: str | None = None  # served when a request names none; None: "default" if loaded, else first
    api_keys: tuple[str, ...] = ()  # accepted bearer keys; empty: no authentication
    max_body_bytes: int = 64 * 1024  # larger request bodies get 413 before they are parsed
    max_prompt_chars: int = 16_384
    max_new_chars: int = 2_000  # the largest `max_new_chars` (and /v1 `max_tokens`) a request may ask for
    max_n: int = 16  # the most samples one request may ask for (/v1: prompts x n)
    # The most characters one request may ask for over all its samples (samples x max_new_chars), never
    # below max_new_chars; None: max_n x max_new_chars.
    max_request_chars: int | None = None
    # The most logprob alternatives one answer may hold (characters x alternatives per character), never
    # below one sample of max_new_chars characters with 5 alternatives.
    max_request_logprobs: int = 40_000
    # Generations (queued + running) one client (its API key; without keys, its address) may hold in a
    # worker; beyond them 429. None: a quarter of max_batch; 0: no limit.
    max_client_jobs: int | None = None
    # Without keys, tell clients apart by the last X-Forwarded-For address (the one a proxy in front
    # appended) instead of the connection's: only when every request comes through that proxy.
    trust_forwarded_for: bool = False
    max_inspect_chars: int = 2_000  # the longest text POST /inspect reads
    # The most activations one /inspect answer holds (characters x the model's cells): 2,000 characters
    # of the default model (512 cells); its JSON is about 6 bytes a value
    max_inspect_values: int = 1 << 20
    max_batch: int = 64  # generations stepped together by the engine
    max_queue: int = 256  # generations waiting for a batch slot; beyond this, 429
    batching: bool = True  # step concurrent generations as one batch
    prompt_cache_bytes: int = 64 << 20  # memory for the recurrent states of recently seen prompts (0: off)
    request_timeout: float = 300.0  # seconds a generation may run; then it ends with finish_reason "deadline"
    health_timeout: float = 10.0  # seconds /health waits for its one-character generation
    torch_threads: int | None = None  # torch intra-op threads; None: left as set by gunicorn.conf.py
    docs: bool = True  # serve the API docs page at /docs
    playground: bool = True  # serve the playground page at /
    host: str = "127.0.0.1"  # the address Gunicorn binds (gunicorn.conf.py reads CHARRNN_HOST too)
    # Host header names answered, comma-separated (".example.com": and its subdomains; "*": any); empty:
    # loopback names when `host` is a loopback address, else any (service/web_security.py says why)
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        limits = ("max_body_bytes", "max_prompt_chars", "max_new_chars", "max_n", "max_inspect_chars")
        limits += ("max_request_logprobs", "max_inspect_values")
        for name in (*limits, "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be >= 1, got {getattr(self, name)}")
        if self.prompt_cache_bytes < 0:
            raise ConfigError(f"{ENV_PREFIX}PROMPT_CACHE_BYTES must be >= 0, got {self.prompt_cache_bytes}")
        for name in ("request_timeout", "health_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be > 0, got {getattr(self, name)}")
        if self.max_request_chars is not None and self.max_request_chars < 1:
            raise ConfigError(f"{ENV_PREFIX}MAX_REQUEST_CHARS must be >= 1, got {self.max_request_chars}")
        if self.max_client_jobs is not None and self.max_client_jobs < 0:
            raise ConfigError(f"{ENV_PREFIX}MAX_CLIENT_JOBS must be >= 0, got {self.max_client_jobs}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"{ENV_PREFIX}TORCH_THREADS must be >= 1, got {self.torch_threads}")
        if any(not key for key in self.api_keys):
            raise ConfigError(f"{ENV_PREFIX}API_KEYS must not contain empty keys")

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


_FIELDS = {f.name: f for f in dataclasses.fields(ServiceConfig)}


def load_config(environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> ServiceConfig:
    """Defaults, then CHARRNN_* variables from `environ`, then `overrides` (upper-case field names)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in _FIELDS:
        text = environ.get(ENV_PREFIX + name.upper())
        if text is not None and text.strip() != "":
            values[name] = _parse(name, text.strip())
    for key, value in (overrides or {}).items():
        name = key.lower()
        if name in _FIELDS:
            values[name] = _coerce(name, value)
    return ServiceConfig(**values)


def _parse(name: str, text: str) -> Any:
    """The value of one environment variable, converted to its field's type."""
    kind = _FIELDS[name].type
    try:
        if "bool" in kind:
            lowered = text.lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError("expected true or false")
            return lowered in ("1", "true", "yes", "on")
        if "tuple" in kind:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        if "Path" in kind:
            return Path(text)
        return text
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={text!r}: {exc}") from None


def _coerce(name: str, value: Any) -> Any:
    """A test-mapping value: strings are parsed like environment variables, lists become tuples."""
    if isinstance(value, str):
        return _parse(name, value)
    if isinstance(value, list):
        return tuple(value)
    return value
