"""OpenAI-compatible endpoints: POST /v1/completions and GET /v1/models, on the same engine.

`max_tokens` counts characters (a character is this model's token). Errors use OpenAI's shape
(service/errors.py). `top_k` and `unknown_chars` are accepted as extensions, as vLLM does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from flask import Blueprint, Response, jsonify

from model.sampling import Token
from service.errors import ApiError
from service.generation import (
    Plan,
    Run,
    check_budget,
    choose_seed,
    client_id,
    current_service,
    disconnect_check,
    encode_prompt,
    new_id,
    sampling_params,
)
from service.schemas import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    OpenAILogprobs,
    OpenAIModel,
    OpenAIModelList,
)
from service.sse import sse_comment, sse_event, sse_response
from service.validation import parse_json_body, validate

log = logging.getLogger(__name__)

bp = Blueprint("openai", __name__, url_prefix="/v1")

FIELDS = {"samples": "prompts x n", "length": "max_tokens", "logprobs": "logprobs"}  # as check_budget names them


@bp.get("/models")
def models() -> Response:
    """The loaded models, as OpenAI lists models."""
    service = current_service()
    created = int(time.time())
    listing = OpenAIModelList(data=[OpenAIModel(id=name, created=created) for name in sorted(service.engine.models)])
    return jsonify(listing.model_dump(mode="json"))


@bp.post("/completions")
def completions() -> Response:
    """A completion for each prompt, `n` choices each (choice index = prompt index * n + sample)."""
    service = current_service()
    body = validate(CompletionRequest, parse_json_body(), service.config)
    jobs = len(body.prompts()) * body.n
    check_budget(service.config, jobs=jobs, chars=body.max_tokens, top_logprobs=body.logprobs or 0, fields=FIELDS)
    loaded = service.model(body.model)
    params = sampling_params(body.temperature, body.top_k, body.top_p)
    seed = choose_seed(body.seed)
    plans = [
        Plan(
            model=loaded,
            prompt_ids=encode_prompt(loaded, prompt, body.unknown_chars),
            max_new_chars=body.max_tokens,
            params=params,
            seed=seed,
            n=body.n,
            stop=body.stop_strings(),
            top_logprobs=body.logprobs or 0,
        )
        for prompt in body.prompts()
    ]
    run = Run(service, client_id(service.config))
    run.submit(plans)
    head = {"id": new_id("cmpl"), "created": int(time.time()), "model": loaded.name}
    prefixes = [prompt if body.echo else "" for prompt in body.prompts() for _ in range(body.n)]
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        response = sse_response(_events(run, plans, head, prefixes, body.logprobs, include_usage))
        response.call_on_close(run.cancel)  # also when the client leaves before the first event
        return response
    choices = [
        CompletionChoice(
            index=i,
            text=prefixes[i] + "".join(t.char for t in tokens),
            finish_reason=_finish_reason(reason),
            logprobs=None if body.logprobs is None else _logprobs(tokens, body.logprobs, len(prefixes[i])),
        )
        for i, (tokens, reason) in enumerate(run.results(disconnect_check()))
    ]
    answer = CompletionResponse(**head, choices=choices, usage=_usage(run, plans))
    return jsonify(answer.model_dump(mode="json"))


def _events(
    run: Run, plans: list[Plan], head: dict, prefixes: list[str], logprobs: int | None, include_usage: bool
) -> Iterator[str]:
    """`data: {chunk}` per piece of text, a chunk with each choice's finish_reason, then `data: [DONE]`."""
    offsets = [len(prefix) for prefix in prefixes]
    started: set[int] = set()
    try:
        for index, tokens, reason in run.stream():
            if tokens is not None and not tokens:
                yield sse_comment("keep-alive")
                continue
            text = "" if index in started else prefixes[index]  # echo: the prompt comes first
            started.add(index)
            if reason is not None:
                choice = CompletionChoice(index=index, text=text, finish_reason=_finish_reason(reason))
            else:
                lp = None if logprobs is None else _logprobs(tokens, logprobs, offsets[index])
                offsets[index] += len(tokens)
                choice = CompletionChoice(index=index, text=text + "".join(t.char for t in tokens), logprobs=lp)
            yield sse_event(CompletionResponse(**head, choices=[choice]).model_dump(mode="json"))
        if include_usage:
            yield sse_event(CompletionResponse(**head, choices=[], usage=_usage(run, plans)).model_dump(mode="json"))
        yield sse_event("[DONE]")
    except ApiError as exc:
        yield sse_event(exc.openai_body())
    except Exception:  # the status line has gone out: report the failure in the stream itself
        log.exception("stream %s failed", head["id"])
        yield sse_event(ApiError(500, "internal_error", "generation failed").openai_body())


def _finish_reason(reason: str) -> str:
    """OpenAI's finish reasons: a generation cut by the server's deadline ran out of length."""
    return "stop" if reason == "stop" else "length"


def _logprobs(tokens: list[Token], top: int, offset: int) -> OpenAILogprobs:
    """OpenAI's logprobs object for generated characters; text_offset counts from the choice's start."""
    return OpenAILogprobs(
        tokens=[t.char for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[dict(t.top or ()) for t in tokens] if top else None,
        text_offset=list(range(offset, offset + len(tokens))),
    )


def _usage(run: Run, plans: list[Plan]) -> CompletionUsage:
    prompt = sum(len(plan.prompt_ids) for plan in plans)
    generated = sum(job.generated_chars for job in run.jobs)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)
