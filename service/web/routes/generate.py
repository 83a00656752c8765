"""POST /generate: text from a model, as one JSON answer or as Server-Sent Events."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from flask import Blueprint, Response, jsonify

from charrnn.model.copies import CopyIndex
from charrnn.model.decoding import Token
from charrnn.service.web.clients import client_id, disconnect_check
from charrnn.service.web.copy_spans import copy_index, copy_spans
from charrnn.service.web.errors import ApiError
from charrnn.service.web.limits import check_budget
from charrnn.service.web.plan import (
    Plan,
    best_results,
    check_best_of,
    choose_seed,
    compile_constraint,
    encode_prompt,
    new_id,
    request_params,
)
from charrnn.service.web.run import Run
from charrnn.service.web.schemas import (
    TOP_LOGPROBS,
    Alternative,
    CharLogprob,
    Choice,
    GenerateRequest,
    GenerateResponse,
    StreamChoiceEnd,
    StreamChunk,
    StreamDone,
    Usage,
    dump,
)
from charrnn.service.web.sse import sse_comment, sse_event, sse_response
from charrnn.service.web.state import current_service
from charrnn.service.web.validation import parse_json_body, validate

log = logging.getLogger(__name__)

bp = Blueprint("generate", __name__)


FIELDS = {"samples": "n", "length": "max_new_chars", "logprobs": "logprobs"}  # as check_budget names them


@bp.post("/generate")
def generate() -> Response:
    """Generate `n` samples after a prompt."""
    service = current_service()
    body = validate(GenerateRequest, parse_json_body(), service.config)
    top = TOP_LOGPROBS if body.logprobs else 0
    check_best_of(body, body.stream)
    check_budget(service.config, jobs=body.samples(), chars=body.max_new_chars, top_logprobs=top, fields=FIELDS)
    loaded = service.model(body.model)
    min_chars = body.copies_min_chars()
    index = copy_index(loaded, min_chars)
    grammar = body.grammar
    constraint = None if grammar is None else compile_constraint(loaded, "grammar.value", grammar.type, grammar.value)
    plan = Plan(
        model=loaded,
        prompt_ids=encode_prompt(loaded, body.prompt, body.unknown_chars),
        max_new_chars=body.max_new_chars,
        params=request_params(body, loaded, constraint, bias_by_char=True),
        seed=choose_seed(body.seed),
        n=body.n,
        stop=body.stop_strings(),
        top_logprobs=top,
        best_of=body.best_of,
    )
    run = Run(service, client_id(service.config))
    run.submit([plan])
    if body.stream:
        response = sse_response(_events(run, plan, new_id(), body.logprobs, index, min_chars))
        response.call_on_close(run.cancel)  # also when the client leaves before the first event
        return response
    choices = [
        Choice(
            index=i,
            text=_text(tokens),
            finish_reason=reason,
            logprobs=_logprobs(tokens) if body.logprobs else None,
            copies=copy_spans(loaded, index, _text(tokens), min_chars),
        )
        for i, (tokens, reason) in enumerate(best_results([plan], run.results(disconnect_check())))
    ]
    answer = GenerateResponse(id=new_id(), model=loaded.name, choices=choices, usage=_usage(run, plan), seed=plan.seed)
    return jsonify(dump(answer))


def _events(
    run: Run, plan: Plan, answer_id: str, logprobs: bool, copies: CopyIndex | None, min_chars: int | None
) -> Iterator[str]:
    """`event: chunk` per piece of text, `event: done` at the end; `event: error` if generation fails.

    Copies (when asked for) come with each choice's end in `done`: a span is known to be maximal only
    once the text after it is.
    """
    finished: list[StreamChoiceEnd] = []
    texts: dict[int, list[str]] = {}
    try:
        for index, tokens, reason in run.stream():
            if reason is not None:
                spans = copy_spans(plan.model, copies, "".join(texts.pop(index, [])), min_chars)
                finished.append(StreamChoiceEnd(index=index, finish_reason=reason, copies=spans))
            elif not tokens:
                yield sse_comment("keep-alive")
            else:
                if copies is not None:
                    texts.setdefault(index, []).append(_text(tokens))
                chunk = StreamChunk(index=index, text=_text(tokens), logprobs=_logprobs(tokens) if logprobs else None)
                yield sse_event(dump(chunk), "chunk")
        done = StreamDone(
            id=answer_id, model=plan.model.name, choices=finished, usage=_usage(run, plan), seed=plan.seed
        )
        yield sse_event(dump(done), "done")
    except ApiError as exc:
        yield sse_event(exc.body(), "error")
    except Exception:  # the status line has gone out: report the failure in the stream itself
        log.exception("stream %s failed", answer_id)
        yield sse_event(ApiError(500, "internal_error", "generation failed").body(), "error")


def _text(tokens: list[Token]) -> str:
    return "".join(t.char for t in tokens)


def _logprobs(tokens: list[Token]) -> list[CharLogprob]:
    return [
        CharLogprob(char=t.char, logprob=t.logprob, top=[Alternative(char=c, logprob=lp) for c, lp in (t.top or ())])
        for t in tokens
    ]


def _usage(run: Run, plan: Plan) -> Usage:
    return Usage(prompt_chars=len(plan.prompt_ids), generated_chars=sum(job.generated_chars for job in run.jobs))
