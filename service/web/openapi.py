"""The OpenAPI 3.1 document of the service, built from the pydantic schemas and the configured limits."""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from charrnn.service.config import ServiceConfig
from charrnn.service.web import schemas

REF = "#/components/schemas/{model}"

NATIVE_ERRORS = {
    "400": "Malformed JSON (also NaN/Infinity, duplicate keys, nesting too deep), or a Host not allowed",
    "401": "Missing or wrong API key (only when keys are configured)",
    "403": "Without API keys, an administrative request that does not come from this machine",
    "413": "Request body over the configured limit",
    "415": "Body not sent as application/json",
    "422": "A field of the wrong type or range, an unknown field or model, or prompt characters outside the vocabulary",
    "429": "The generation queue is full, or this client already holds its share of generations; see Retry-After",
    "500": "The server failed; no traceback is included",
    "503": "Not ready, or shutting down",
}

INSPECT_429 = "All of this worker's inspection slots are taken; see the Retry-After header"

GENERATE_EXAMPLE = {"prompt": "ROMEO:", "max_new_chars": 100, "temperature": 0.8, "seed": 42, "stop": ["\n\n"]}
INSPECT_EXAMPLE = {"text": 'He said "to be (or not) to be".\nAnd left.', "layer": 0}
COMPLETION_EXAMPLE = {"model": "default", "prompt": "ROMEO:", "max_tokens": 100, "temperature": 0.8, "seed": 42}
CHAT_EXAMPLE = {
    "model": "default",
    "messages": [{"role": "system", "content": "Verona, a summer night."}, {"role": "user", "content": "Good even."}],
    "max_completion_tokens": 200,
    "seed": 42,
}
CHAT_DESCRIPTION = (
    "The model card's chat template (docs/SERVICE.md) renders `messages` into a prompt that ends where the "
    "assistant's turn begins, and the reply ends at the template's stop strings (and the request's `stop`). "
    "A model whose card has no template uses a plain transcript (`User: ...`, `Assistant: ...`). With "
    "`stream: true`: `data: {ChatCompletionChunk}` events (a delta with the role first, then content deltas, "
    "then one with the finish_reason, per choice), then `data: [DONE]`."
)

INSPECT_DESCRIPTION = (
    "The model reads the text from a zero state. For the chosen layer the answer holds, after each character, "
    "every cell's activation (tanh of the cell state for an LSTM, the hidden state for a GRU or RNN), and for "
    "each simple feature of the text (inside quotes, first character of a line, inside brackets, position in "
    "the line) the cells whose activations follow it best, by absolute Pearson correlation over the text. "
    "An answer holds at most CHARRNN_MAX_INSPECT_VALUES activations (characters x cells); a longer text is a 422."
)

STREAM_DESCRIPTION = (
    "With `stream: true`: Server-Sent Events. `event: chunk` with a StreamChunk as data, once per piece of "
    "text (samples one after another, each tagged with its index); then `event: done` with a StreamDone "
    "(where each sample's `copies` come, when asked for). "
    "A failure after the stream began is `event: error` with an ErrorResponse. Lines starting with `:` "
    "are keep-alive comments."
)

_MODELS: list[type[BaseModel]] = [
    schemas.GenerateRequest,
    schemas.GenerateResponse,
    schemas.StreamChunk,
    schemas.StreamDone,
    schemas.InspectRequest,
    schemas.InspectResponse,
    schemas.ModelsResponse,
    schemas.ReloadResponse,
    schemas.HealthResponse,
    schemas.ErrorResponse,
    schemas.CompletionRequest,
    schemas.CompletionResponse,
    schemas.ChatCompletionRequest,
    schemas.ChatCompletionResponse,
    schemas.ChatCompletionChunk,
    schemas.OpenAIModelList,
    schemas.OpenAIErrorResponse,
    schemas.ScoreRequest,
    schemas.ScoreResponse,
    schemas.TokenizeRequest,
    schemas.TokenizeResponse,
    schemas.DetokenizeRequest,
    schemas.DetokenizeResponse,
    schemas.TokenizerInfoResponse,
]


@functools.lru_cache(maxsize=16)
def openapi_json(config: ServiceConfig) -> bytes:
    """The document as JSON, built once per configuration (a build takes ~15 ms of CPU; /openapi.json is open)."""
    return json.dumps(openapi_document(config), separators=(",", ":")).encode()


def openapi_document(config: ServiceConfig) -> dict[str, Any]:
    """The whole document; limits in the request schemas are the ones this server enforces."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "charrnn text generation",
            "version": "1",
            "description": "Character-level RNN text generation. Every error answers "
            '`{"error": {"code", "message", "field"?}}`; under /v1/ errors use OpenAI\'s shape.',
        },
        "paths": _paths(config),
        "components": {"schemas": _component_schemas(config), "securitySchemes": _security_schemes()},
        "security": [{"bearer": []}] if config.api_keys else [],
    }


def _component_schemas(config: ServiceConfig) -> dict[str, Any]:
    pairs = [(m, "validation" if m.__name__.endswith("Request") else "serialization") for m in _MODELS]
    _, document = models_json_schema(pairs, ref_template=REF)
    found = document["$defs"]
    _write_configured_limits(found, config)
    for name, samples, length in (
        ("GenerateRequest", "n", "max_new_chars"),
        ("CompletionRequest", "prompts x n", "max_tokens"),
        ("ChatCompletionRequest", "n", "max_completion_tokens"),
    ):
        found[name]["description"] += " " + _budget_text(config, samples, length)
    return found


# The JSON-schema keyword that states a limit, by the limited value's type.
LIMIT_KEYWORDS = {"integer": "maximum", "string": "maxLength", "array": "maxItems"}


def _write_configured_limits(node: Any, config: ServiceConfig) -> None:
    """Replace each `schemas.configured(setting)` mark in `node` by that setting's value as the field's limit."""
    if isinstance(node, dict):
        setting = node.pop(schemas.SETTING_KEY, None)
        if setting is not None:
            # An optional field's schema is anyOf [the type, null]: the limit goes on the type.
            typed = next(v for v in node.get("anyOf", [node]) if v.get("type") in LIMIT_KEYWORDS)
            typed[LIMIT_KEYWORDS[typed["type"]]] = getattr(config, setting)
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            _write_configured_limits(child, config)


def _budget_text(config: ServiceConfig, samples: str, length: str) -> str:
    """The per-request and per-client limits of this server, as a request schema's description says them."""
    text = (
        f"Limits of this server (a request over one is a 422 naming it): {samples} <= {config.max_n} samples; "
        f"samples x {length} <= {config.request_char_limit} characters; samples x {length} x logprob "
        f"alternatives <= {config.request_logprob_limit(schemas.TOP_LOGPROBS)}."
    )
    if config.client_job_limit is not None:
        text += (
            f" A client (its API key; without keys, its address) may hold {config.client_job_limit} generations "
            "(queued + running) at once; a request beyond them is a 429 with Retry-After, except that a client "
            "holding none may always send one."
        )
    return text


def _security_schemes() -> dict[str, Any]:
    return {"bearer": {"type": "http", "scheme": "bearer", "description": "one of CHARRNN_API_KEYS"}}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=name)}}}


def _json_text(name: str) -> dict[str, Any]:
    """A string holding a JSON document of schema `name` (an event's data field)."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": {"$ref": REF.format(model=name)}}


def _event_stream(events: dict[str, str]) -> dict[str, Any]:
    """Server-Sent Events whose `data` is JSON of a schema chosen by the event's name.

    `schema` describes one event (an object with `event` and `data`), as OpenAPI 3.2's `itemSchema`
    does and as tools read `schema` of a sequential media type before 3.2.
    """
    one_event = {
        "type": "object",
        "required": ["event", "data"],
        "oneOf": [
            {"properties": {"event": {"const": name}, "data": _json_text(schema)}} for name, schema in events.items()
        ],
    }
    return {"text/event-stream": {"schema": one_event}}


def _openai_event_stream(chunk: str = "CompletionResponse") -> dict[str, Any]:
    """OpenAI's stream: unnamed events whose data is a `chunk` or an error, then `[DONE]`."""
    data = {"anyOf": [_json_text(chunk), _json_text("OpenAIErrorResponse"), {"const": "[DONE]"}]}
    return {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}}


def _errors(codes: list[str], schema: str = "ErrorResponse") -> dict[str, Any]:
    return {code: {"description": NATIVE_ERRORS[code], "content": _json(schema)} for code in codes}


BODY_ERRORS = ["400", "401", "413", "415", "422", "429", "500", "503"]
OPEN: list[dict[str, list[str]]] = []  # `security` of the endpoints that need no key


def _paths(config: ServiceConfig) -> dict[str, Any]:
    """Every endpoint, by path."""
    return _generate_path() | _inspect_path() | _scoring_paths() | _info_paths() | _openai_paths() | _docs_paths(config)


def _body(schema: str, example: dict[str, Any]) -> dict[str, Any]:
    content = {"schema": {"$ref": REF.format(model=schema)}, "example": example}
    return {"required": True, "content": {"application/json": content}}


def _generate_path() -> dict[str, Any]:
    ok = {
        "description": "The samples; or, with `stream`, an event stream",
        "content": _json("GenerateResponse")
        | _event_stream({"chunk": "StreamChunk", "done": "StreamDone", "error": "ErrorResponse"}),
    }
    return {
        "/generate": {
            "post": {
                "summary": "Generate text after a prompt",
                "description": STREAM_DESCRIPTION,
                "requestBody": _body("GenerateRequest", GENERATE_EXAMPLE),
                "responses": {"200": ok, **_errors(BODY_ERRORS)},
            }
        }
    }


def _inspect_path() -> dict[str, Any]:
    errors = _errors(BODY_ERRORS)
    errors["429"] = errors["429"] | {"description": INSPECT_429}
    return {
        "/inspect": {
            "post": {
                "summary": "Look inside: a recurrent layer's cell activations per character of a text",
                "description": INSPECT_DESCRIPTION,
                "requestBody": _body("InspectRequest", INSPECT_EXAMPLE),
                "responses": {"200": {"description": "The activations", "content": _json("InspectResponse")}, **errors},
            }
        }
    }


SCORE_EXAMPLE = {"text": "To be, or not to be", "context": "HAMLET:\n", "top_logprobs": 1}
SCORE_429 = "All of this worker's scoring slots are taken; see the Retry-After header"
TOKENS_DESCRIPTION = (
    "vLLM's tokenizer endpoints for a character model: a token is one character, its id the character's index "
    "in the model's vocabulary (GET /tokenizer_info lists it)."
)


def _scoring_paths() -> dict[str, Any]:
    score_errors = _errors(BODY_ERRORS)
    score_errors["429"] = score_errors["429"] | {"description": SCORE_429}
    token_errors = {code: v for code, v in _errors(BODY_ERRORS).items() if code != "429"}
    model_query = {
        "name": "model",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "a name from GET /models; the default model without it",
    }
    return {
        "/score": {
            "post": {
                "summary": "Exact scoring: each character's log-probability under the model, and their sum",
                "requestBody": _body("ScoreRequest", SCORE_EXAMPLE),
                "responses": {"200": {"description": "The scores", "content": _json("ScoreResponse")}, **score_errors},
            }
        },
        "/tokenize": {
            "post": {
                "summary": "Characters to vocabulary indices",
                "description": TOKENS_DESCRIPTION,
                "requestBody": _body("TokenizeRequest", {"prompt": "ROMEO:"}),
                "responses": {"200": {"description": "The ids", "content": _json("TokenizeResponse")}, **token_errors},
            }
        },
        "/detokenize": {
            "post": {
                "summary": "Vocabulary indices to characters",
                "description": TOKENS_DESCRIPTION,
                "requestBody": _body("DetokenizeRequest", {"tokens": [30, 27, 25]}),
                "responses": {
                    "200": {"description": "The text", "content": _json("DetokenizeResponse")},
                    **token_errors,
                },
            }
        },
        "/tokenizer_info": {
            "get": {
                "summary": "The model's vocabulary and end-of-text character",
                "description": TOKENS_DESCRIPTION,
                "parameters": [model_query],
                "responses": {
                    "200": {"description": "The vocabulary", "content": _json("TokenizerInfoResponse")},
                    **_errors(["401", "422"]),
                },
            }
        },
    }


def _info_paths() -> dict[str, Any]:
    return {
        "/models": {
            "get": {
                "summary": "The checkpoints of the model directory and their load status",
                "responses": {"200": {"description": "Every checkpoint", "content": _json("ModelsResponse")}}
                | _errors(["401"]),
            }
        },
        "/admin/reload": {
            "post": {
                "summary": "Check the model directory now in this worker (every other worker follows within seconds)",
                "description": "Loads checkpoints added or changed since the last check and stops serving removed "
                "ones; a file that fails to load leaves the model served under its name as it was. Generations in "
                "flight finish on the model they started with. With API keys configured it needs one; without, "
                "only requests from this machine (a loopback address, no forwarding header) are answered. "
                "SIGHUP to the server's master does the same for every worker.",
                "responses": {"200": {"description": "What the check found", "content": _json("ReloadResponse")}}
                | _errors(["401", "403"]),
            }
        },
        "/health": {
            "get": {
                "summary": "Readiness: each loaded model is known to generate (a recent step, or a 1-character check)",
                "security": OPEN,
                "responses": {
                    "200": {"description": "Ready", "content": _json("HealthResponse")},
                    "503": {"description": "Not ready", "content": _json("HealthResponse")},
                },
            }
        },
        "/health/live": {
            "get": {
                "summary": "Liveness: the worker answers and, with jobs, has stepped them recently",
                "security": OPEN,
                "responses": {"200": {"description": "Alive"}, "503": {"description": "Jobs have stopped stepping"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (summed over all workers)",
                "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {}}}}
                | _errors(["401"]),
            }
        },
    }


def _openai_paths() -> dict[str, Any]:
    return {
        "/v1/completions": {
            "post": {
                "summary": "OpenAI-compatible completions (max_tokens counts characters)",
                "description": "With `stream: true`: `data: {CompletionResponse chunk}` events, then `data: [DONE]`.",
                "requestBody": _body("CompletionRequest", COMPLETION_EXAMPLE),
                "responses": {
                    "200": {
                        "description": "The completion; or, with `stream`, an event stream",
                        "content": _json("CompletionResponse") | _openai_event_stream(),
                    },
                    **_errors(BODY_ERRORS, "OpenAIErrorResponse"),
                },
            }
        },
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI-compatible chat completions through the model's chat template",
                "description": CHAT_DESCRIPTION,
                "requestBody": _body("ChatCompletionRequest", CHAT_EXAMPLE),
                "responses": {
                    "200": {
                        "description": "The reply; or, with `stream`, an event stream",
                        "content": _json("ChatCompletionResponse") | _openai_event_stream("ChatCompletionChunk"),
                    },
                    **_errors(BODY_ERRORS, "OpenAIErrorResponse"),
                },
            }
        },
        "/v1/models": {
            "get": {
                "summary": "OpenAI-compatible model list",
                "responses": {"200": {"description": "The loaded models", "content": _json("OpenAIModelList")}}
                | _errors(["401"], "OpenAIErrorResponse"),
            }
        },
    }


def _docs_paths(config: ServiceConfig) -> dict[str, Any]:
    """The pages; one turned off (CHARRNN_PLAYGROUND, CHARRNN_DOCS) is left out of the document."""
    paths = {
        "/": {
            "get": {
                "summary": "The playground: a page to generate text, see its probabilities and look inside the cells",
                "security": OPEN,
                "responses": {"200": {"description": "HTML"}},
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "security": OPEN, "responses": {"200": {"description": "OK"}}}
        },
        "/docs": {
            "get": {
                "summary": "A readable page rendering this document",
                "security": OPEN,
                "responses": {"200": {"description": "HTML"}},
            }
        },
    }
    if not config.playground:
        del paths["/"]
    if not config.docs:
        del paths["/docs"]
    return paths
