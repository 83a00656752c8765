"""Request-size checks: one request may ask for only so many samples, characters and logprob alternatives."""

from __future__ import annotations

from charrnn.service.config import ServiceConfig
from charrnn.service.web.errors import ApiError
from charrnn.service.web.schemas import TOP_LOGPROBS


def check_budget(config: ServiceConfig, *, jobs: int, chars: int, top_logprobs: int, fields: dict[str, str]) -> None:
    """422 naming the limit when one request asks for more work than this server allows.

    `jobs` samples of at most `chars` characters each, with `top_logprobs` alternatives per character;
    `fields` says how the request counts samples ("samples") and names its "length" and "logprobs" fields.
    """
    total, char_limit = jobs * chars, config.request_char_limit
    if jobs > config.max_n:
        message = f"this request asks for {jobs} samples ({fields['samples']}); at most {config.max_n} per request"
        _over(message, "MAX_N", "n")
    if total > char_limit:
        message = f"this request asks for up to {total} characters ({jobs} samples x {chars} {fields['length']})"
        _over(f"{message}; at most {char_limit} per request", "MAX_REQUEST_CHARS", fields["length"])
    check_logprob_budget(config, total * top_logprobs, f"{total} characters x {top_logprobs}", fields["logprobs"])


def check_logprob_budget(config: ServiceConfig, alternatives: int, how: str, field_name: str) -> None:
    """422 naming the limit when one answer would hold more logprob alternatives than this server allows;
    `how` says how the request adds them up."""
    limit = config.request_logprob_limit(TOP_LOGPROBS)
    if alternatives > limit:
        message = f"this request asks for up to {alternatives} logprob alternatives ({how})"
        message += f"; at most {limit} per request"
        _over(message, "MAX_REQUEST_LOGPROBS", field_name)


def _over(message: str, setting: str, field_name: str) -> None:
    raise ApiError(422, "request_too_large", f"{message} (CHARRNN_{setting})", field_name)
