"""OpenAI-compatible endpoints: POST /v1/completions and GET /v1/models, on the same engine.

`max_tokens` counts characters (a character is this model's token). Errors use OpenAI's shape
(service/web/errors.py). `top_k` and `unknown_chars` are accepted as extensions, as vLLM does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from flask import Blueprint, Response, jsonify

from charrnn.model.decoding import Token
from charrnn.model.scoring import score_ids
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.web.clients import client_id, disconnect_check
from charrnn.service.web.errors import ApiError
from charrnn.service.web.limits import check_budget, check_logprob_budget
from charrnn.service.web.openai_shapes import openai_finish_reason, openai_usage
from charrnn.service.web.plan import (
    Plan,
    best_results,
    check_best_of,
    choose_seed,
    encode_prompt,
    guided_constraint,
    new_id,
    request_params,
)
from charrnn.service.web.run import Run
from charrnn.service.web.schemas import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    OpenAILogprobs,
    OpenAIModel,
    OpenAIModelList,
)
from charrnn.service.web.slots import slot
from charrnn.service.web.sse import sse_comment, sse_event, sse_response
from charrnn.service.web.state import Service, current_service
from charrnn.service.web.validation import parse_json_body, validate

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
    check_best_of(body, body.stream)
    jobs = len(body.prompts()) * body.samples()
    check_budget(service.config, jobs=jobs, chars=body.max_tokens, top_logprobs=body.logprobs or 0, fields=FIELDS)
    _check_scoring_only(body)
    loaded = service.model(body.model)
    prompts = [_read_prompt(loaded, prompt, body.unknown_chars) for prompt in body.prompts()]
    scored = _prompt_logprobs(service, loaded, prompts, body) if body.echo and body.logprobs is not None else None
    head = {"id": new_id("cmpl"), "created": int(time.time()), "model": loaded.name}
    prefixes = [prompt.text if body.echo else "" for prompt in prompts for _ in range(body.n)]
    echoed = [lp for lp in scored for _ in range(body.n)] if scored is not None else None
    if body.max_tokens == 0:  # echo only: score the prompts, generate nothing
        choices = [
            CompletionChoice(index=i, text=prefixes[i], finish_reason="length", logprobs=echoed[i] if echoed else None)
            for i in range(len(prefixes))
        ]
        usage = openai_usage([prompt.ids for prompt in prompts], generated=0)
        return jsonify(CompletionResponse(**head, choices=choices, usage=usage).model_dump(mode="json"))
    params = request_params(body, loaded, guided_constraint(loaded, body))
    seed = choose_seed(body.seed)
    plans = [
        Plan(
            model=loaded,
            prompt_ids=prompt.ids,
            max_new_chars=body.max_tokens,
            params=params,
            seed=seed,
            n=body.n,
            stop=body.stop_strings(),
            top_logprobs=body.logprobs or 0,
            best_of=body.best_of,
        )
        for prompt in prompts
    ]
    run = Run(service, client_id(service.config))
    run.submit(plans)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        response = sse_response(_events(run, plans, head, prefixes, body.logprobs, include_usage, echoed))
        response.call_on_close(run.cancel)  # also when the client leaves before the first event
        return response
    choices = []
    for i, (tokens, reason) in enumerate(best_results(plans, run.results(disconnect_check()))):
        logprobs = None
        if body.logprobs is not None:
            logprobs = _joined(echoed[i] if echoed else None, _logprobs(tokens, body.logprobs, len(prefixes[i])))
        text = prefixes[i] + "".join(t.char for t in tokens)
        choices.append(
            CompletionChoice(index=i, text=text, finish_reason=openai_finish_reason(reason), logprobs=logprobs)
        )
    usage = openai_usage([plan.prompt_ids for plan in plans], generated=sum(job.generated_chars for job in run.jobs))
    answer = CompletionResponse(**head, choices=choices, usage=usage)
    return jsonify(answer.model_dump(mode="json"))


@dataclass(frozen=True)
class _Prompt:
    """A prompt as read: its text (what `echo` returns), its vocabulary ids, and each id's offset in the text."""

    text: str
    ids: tuple[int, ...]
    offsets: tuple[int, ...]


def _read_prompt(loaded: LoadedModel, prompt: str | list[int], unknown: str) -> _Prompt:
    """A prompt given as text or as vocabulary indices; an index outside the vocabulary is a 422 on `prompt`."""
    chars = loaded.vocab.chars
    if isinstance(prompt, list):
        bad = next((i for i in prompt if i >= len(chars)), None)
        if bad is not None:
            message = f"token {bad} is not in the model's vocabulary (0 to {len(chars) - 1}; see POST /tokenize)"
            raise ApiError(422, "invalid_value", message, "prompt")
        return _Prompt("".join(chars[i] for i in prompt), tuple(prompt), tuple(range(len(prompt))))
    ids = encode_prompt(loaded, prompt, unknown)
    offsets = tuple(i for i, char in enumerate(prompt) if char in loaded.vocab)  # unknown characters dropped
    return _Prompt(prompt, ids, offsets)


def _check_scoring_only(body: CompletionRequest) -> None:
    """max_tokens 0 only scores the prompts: it needs echo, and there is nothing to stream."""
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(
            422, "invalid_value", "max_tokens 0 only scores the prompt, which needs echo: true", "max_tokens"
        )
    if body.max_tokens == 0 and body.stream:
        raise ApiError(
            422, "invalid_value", "max_tokens 0 only scores the prompt: there is nothing to stream", "stream"
        )


def _prompt_logprobs(service: Service, loaded: LoadedModel, prompts: list[_Prompt], body: CompletionRequest) -> list:
    """For `echo` with `logprobs`: each prompt's characters with their log-probabilities read from a zero
    state, as the generation after it reads the prompt (the first character's is null: nothing precedes it)."""
    top = body.logprobs or 0
    read = sum(len(p.ids) for p in prompts) * body.n
    how = f"echo: {read} prompt characters x {max(top, 1)}"
    check_logprob_budget(service.config, read * max(top, 1), how, "logprobs")
    chars = loaded.vocab.chars
    scored = []
    with slot("score", "the server is busy scoring other texts; retry later"):
        for prompt in prompts:
            scores = score_ids(loaded.model, prompt.ids[:1], prompt.ids[1:], top=top) if prompt.ids else []
            scored.append(
                OpenAILogprobs(
                    tokens=[chars[i] for i in prompt.ids],
                    token_logprobs=[None] * bool(prompt.ids) + [s.logprob for s in scores],
                    top_logprobs=[None] * bool(prompt.ids) + [{chars[i]: v for i, v in s.top} for s in scores]
                    if top
                    else None,
                    text_offset=list(prompt.offsets),
                )
            )
    return scored


def _joined(first: OpenAILogprobs | None, second: OpenAILogprobs) -> OpenAILogprobs:
    """The prompt's logprobs (when echoed) followed by the generated characters'."""
    if first is None:
        return second
    tops = None if first.top_logprobs is None else first.top_logprobs + (second.top_logprobs or [])
    return OpenAILogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=tops,
        text_offset=first.text_offset + second.text_offset,
    )


def _events(
    run: Run,
    plans: list[Plan],
    head: dict,
    prefixes: list[str],
    logprobs: int | None,
    include_usage: bool,
    echoed: list[OpenAILogprobs] | None,
) -> Iterator[str]:
    """`data: {chunk}` per piece of text, a chunk with each choice's finish_reason, then `data: [DONE]`."""
    offsets = [len(prefix) for prefix in prefixes]
    started: set[int] = set()
    try:
        for index, tokens, reason in run.stream():
            if tokens is not None and not tokens:
                yield sse_comment("keep-alive")
                continue
            first = index not in started
            text = prefixes[index] if first else ""  # echo: the prompt comes first
            prompt_lp = echoed[index] if echoed is not None and first else None
            started.add(index)
            if reason is not None:
                choice = CompletionChoice(
                    index=index, text=text, finish_reason=openai_finish_reason(reason), logprobs=prompt_lp
                )
            else:
                lp = None if logprobs is None else _joined(prompt_lp, _logprobs(tokens, logprobs, offsets[index]))
                offsets[index] += len(tokens)
                choice = CompletionChoice(index=index, text=text + "".join(t.char for t in tokens), logprobs=lp)
            yield sse_event(CompletionResponse(**head, choices=[choice]).model_dump(mode="json"))
        if include_usage:
            yield sse_event(
                CompletionResponse(
                    **head,
                    choices=[],
                    usage=openai_usage(
                        [plan.prompt_ids for plan in plans], sum(job.generated_chars for job in run.jobs)
                    ),
                ).model_dump(mode="json")
            )
        yield sse_event("[DONE]")
    except ApiError as exc:
        yield sse_event(exc.openai_body())
    except Exception:  # the status line has gone out: report the failure in the stream itself
        log.exception("stream %s failed", head["id"])
        yield sse_event(ApiError(500, "internal_error", "generation failed").openai_body())


def _logprobs(tokens: list[Token], top: int, offset: int) -> OpenAILogprobs:
    """OpenAI's logprobs object for generated characters; text_offset counts from the choice's start."""
    return OpenAILogprobs(
        tokens=[t.char for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[dict(t.top or ()) for t in tokens] if top else None,
        text_offset=list(range(offset, offset + len(tokens))),
    )
