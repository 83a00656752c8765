"""Exact scoring and the tokenizer: POST /score, POST /tokenize, POST /detokenize, GET /tokenizer_info.

The vocabulary is the alphabet, so a token is one character and its id is the character's index in
the vocabulary: these are vLLM's tokenizer endpoints with that meaning, which lets clients such as
lm-evaluation-harness (`tokenizer_backend=remote`) work without downloading a tokenizer. Scoring reads
the text in the request's thread (model.scoring), at most SLOTS["score"] at a time per worker (web/slots.py).
"""

from __future__ import annotations

import math

from flask import Blueprint, Response, jsonify, request

from charrnn.model.generation import start_ids
from charrnn.model.scoring import score_ids
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.web.errors import ApiError
from charrnn.service.web.limits import check_logprob_budget
from charrnn.service.web.plan import encode_prompt
from charrnn.service.web.schemas import (
    Alternative,
    CharLogprob,
    DetokenizeRequest,
    DetokenizeResponse,
    ScoreRequest,
    ScoreResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    dump,
)
from charrnn.service.web.slots import slot
from charrnn.service.web.state import current_service
from charrnn.service.web.validation import parse_json_body, validate

bp = Blueprint("scoring", __name__)


@bp.post("/score")
def score() -> Response:
    """Each character's log-probability after `context`, their sum, and nats and bits per character."""
    service = current_service()
    body = validate(ScoreRequest, parse_json_body(), service.config)
    loaded = service.model(body.model)
    ids = encode_prompt(loaded, body.text, body.unknown_chars, field_name="text")
    if not ids:
        raise ApiError(422, "invalid_value", "none of the text's characters is in the model's vocabulary", "text")
    how = f"{len(ids)} characters x {body.top_logprobs}"
    check_logprob_budget(service.config, len(ids) * body.top_logprobs, how, "top_logprobs")
    context = start_ids(loaded.vocab, list(encode_prompt(loaded, body.context, body.unknown_chars, "context")))
    with slot("score", "the server is busy scoring other texts; retry later"):
        scores = score_ids(loaded.model, context, ids, top=body.top_logprobs)
    chars = loaded.vocab.chars
    total = math.fsum(s.logprob for s in scores)
    answer = ScoreResponse(
        model=loaded.name,
        logprobs=[
            CharLogprob(
                char=chars[s.id], logprob=s.logprob, top=[Alternative(char=chars[i], logprob=v) for i, v in s.top]
            )
            for s in scores
        ],
        total_logprob=total,
        nats_per_char=-total / len(scores),
        bits_per_char=-total / len(scores) / math.log(2),
    )
    return jsonify(dump(answer))


@bp.post("/tokenize")
def tokenize() -> Response:
    """The prompt's vocabulary indices (one per character); an unknown character is a 422 naming it."""
    service = current_service()
    body = validate(TokenizeRequest, parse_json_body(), service.config)
    loaded = service.model(body.model)
    ids = list(encode_prompt(loaded, body.prompt, "error"))
    strs = [loaded.vocab.chars[i] for i in ids] if body.return_token_strs else None
    answer = TokenizeResponse(
        count=len(ids), max_model_len=service.config.max_prompt_chars, tokens=ids, token_strs=strs
    )
    return jsonify(dump(answer))


@bp.post("/detokenize")
def detokenize() -> Response:
    """The text of a list of vocabulary indices; an index outside the vocabulary is a 422."""
    service = current_service()
    body = validate(DetokenizeRequest, parse_json_body(), service.config)
    loaded = service.model(body.model)
    size = len(loaded.vocab)
    bad = next((i for i in body.tokens if i >= size), None)
    if bad is not None:
        raise ApiError(422, "invalid_value", f"token {bad} is not in the vocabulary (0 to {size - 1})", "tokens")
    return jsonify(dump(DetokenizeResponse(prompt="".join(loaded.vocab.chars[i] for i in body.tokens))))


@bp.get("/tokenizer_info")
def tokenizer_info() -> Response:
    """The vocabulary of `?model=` (the default model without it) and its end-of-text character."""
    service = current_service()
    loaded = service.model(request.args.get("model"))
    answer = TokenizerInfoResponse(
        model=loaded.name,
        vocab_size=len(loaded.vocab),
        vocab=list(loaded.vocab.chars),
        eos_token=_eos(loaded),
        model_max_length=service.config.max_prompt_chars,
    )
    return jsonify(dump(answer))


def _eos(loaded: LoadedModel) -> str:
    """The character an empty prompt conditions on (a newline, where the vocabulary has one)."""
    return loaded.vocab.chars[start_ids(loaded.vocab, [])[0]]
