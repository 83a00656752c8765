"""OpenAI's chat completions, POST /v1/chat/completions, on the same engine as /v1/completions.

A character model has no chat training: the model card's chat template (model/chat_template.py) renders
the conversation into a prompt that ends where the assistant's turn begins, and the model's continuation,
cut at the template's stop strings, is the reply. Everything after the prompt is /v1/completions' own
code: the same fields, plan, run, limits, constraints and errors (OpenAI's shape).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify

from charrnn.model.chat_template import ChatTemplate, ChatTemplateError
from charrnn.model.decoding import Token
from charrnn.model.export import card_path, read_card
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.web.clients import client_id, disconnect_check
from charrnn.service.web.errors import ApiError
from charrnn.service.web.limits import check_budget
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
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatReply,
    ChatTokenLogprob,
    ChatTopLogprob,
)
from charrnn.service.web.sse import sse_comment, sse_event, sse_response
from charrnn.service.web.state import current_service
from charrnn.service.web.validation import parse_json_body, validate

log = logging.getLogger(__name__)

bp = Blueprint("chat", __name__, url_prefix="/v1")


@bp.post("/chat/completions")
def chat_completions() -> Response:
    """The assistant's reply to a conversation, `n` choices (choice index = sample)."""
    service = current_service()
    body = validate(ChatCompletionRequest, parse_json_body(), service.config)
    check_best_of(body, body.stream)
    fields = {"samples": "n", "length": body.length_field(), "logprobs": "top_logprobs"}
    check_budget(
        service.config, jobs=body.samples(), chars=body.length(), top_logprobs=body.alternatives(), fields=fields
    )
    loaded = service.model(body.model)
    prompt, stop = _render(loaded, body, service.config.max_prompt_chars)
    plan = Plan(
        model=loaded,
        prompt_ids=_encode(loaded, body, prompt),
        max_new_chars=body.length(),
        params=request_params(body, loaded, guided_constraint(loaded, body)),
        seed=choose_seed(body.seed),
        n=body.n,
        stop=stop + body.stop_strings(),
        top_logprobs=body.alternatives(),
        best_of=body.best_of,
    )
    run = Run(service, client_id(service.config))
    run.submit([plan])
    head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": loaded.name}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        response = sse_response(_events(run, plan, head, body.logprobs, include_usage))
        response.call_on_close(run.cancel)  # also when the client leaves before the first event
        return response
    choices = [
        ChatChoice(
            index=i,
            message=ChatReply(content="".join(t.char for t in tokens)),
            finish_reason=openai_finish_reason(reason),
            logprobs=_logprobs(tokens) if body.logprobs else None,
        )
        for i, (tokens, reason) in enumerate(best_results([plan], run.results(disconnect_check())))
    ]
    usage = openai_usage([plan.prompt_ids], generated=sum(job.generated_chars for job in run.jobs))
    return jsonify(ChatCompletionResponse(**head, choices=choices, usage=usage).model_dump(mode="json"))


def _render(loaded: LoadedModel, body: ChatCompletionRequest, max_chars: int) -> tuple[str, tuple[str, ...]]:
    """The conversation as the model's prompt, and the stop strings that end the reply; 422 on `messages`
    when it renders longer than the server reads."""
    try:
        prompt, stop = _template(loaded).render(body.conversation())
    except ChatTemplateError as exc:  # the schema admits only what renders: kept for the template's own rules
        raise ApiError(422, "invalid_value", str(exc), "messages") from None
    if len(prompt) > max_chars:
        message = f"the conversation renders to a prompt of {len(prompt)} characters; at most {max_chars} on this "
        raise ApiError(422, "invalid_value", message + "server (CHARRNN_MAX_PROMPT_CHARS)", "messages")
    return prompt, stop


def _encode(loaded: LoadedModel, body: ChatCompletionRequest, prompt: str) -> tuple[int, ...]:
    """The rendered conversation's ids; a 422 on `messages` for characters the vocabulary lacks, which says so
    when the template's own text holds some (a model without a card, whose default transcript writes "User: "
    and "Assistant: "): no message the client can send would do then."""
    try:
        return encode_prompt(loaded, prompt, body.unknown_chars, "messages")
    except ApiError:
        vocab, sent = loaded.vocab, {char for _, text in body.conversation() for char in text}
        template_only = sorted({char for char in prompt if char not in vocab and char not in sent})
        if not template_only:
            raise
        shown = ", ".join(repr(char) for char in template_only[:20])
        template = _template(loaded)
        message = (
            f"model {loaded.name!r}'s chat template ({template.kind}, user {template.user!r}, assistant "
            f'{template.assistant!r}) writes characters its vocabulary lacks: {shown}; send "unknown_chars": '
            '"drop", or give the model a template in its own characters (charrnn export --chat-template)'
        )
        raise ApiError(422, "unknown_characters", message, "messages") from None


def _template(loaded: LoadedModel) -> ChatTemplate:
    """The model's chat template, from the card beside its checkpoint (read again only when the card changes)."""
    try:
        changed = card_path(loaded.path).stat().st_mtime_ns
    except FileNotFoundError:
        return ChatTemplate.from_card(None)
    return _card_template(loaded.name, loaded.path, changed)


@functools.lru_cache(maxsize=64)
def _card_template(name: str, checkpoint: Path, changed: int) -> ChatTemplate:
    """The template the checkpoint's card holds, once per version of the card (`changed`, its mtime); a card
    that cannot be read, or whose template is invalid, is the server's fault and answered as such."""
    try:
        return ChatTemplate.from_card(read_card(checkpoint))
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not a template (ChatTemplateError)
        log.error("model %s: the card of %s has no usable chat template: %s", name, checkpoint, exc)
        raise ApiError(500, "invalid_chat_template", f"model {name!r} has a broken chat template in its card") from None


def _events(run: Run, plan: Plan, head: dict, logprobs: bool, include_usage: bool) -> Iterator[str]:
    """Per choice: a chunk with the role, chunks of content, one with the finish_reason; then the usage
    (if asked) and `data: [DONE]`."""
    started: set[int] = set()
    try:
        for index, tokens, reason in run.stream():
            if tokens is not None and not tokens:
                yield sse_comment("keep-alive")
                continue
            if index not in started:
                started.add(index)
                yield _chunk(head, ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content="")))
            if reason is not None:
                choice = ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=openai_finish_reason(reason))
            else:
                text = "".join(t.char for t in tokens)
                lp = _logprobs(tokens) if logprobs else None
                choice = ChatChunkChoice(index=index, delta=ChatDelta(content=text), logprobs=lp)
            yield _chunk(head, choice)
        if include_usage:
            usage = openai_usage([plan.prompt_ids], sum(job.generated_chars for job in run.jobs))
            yield sse_event(ChatCompletionChunk(**head, choices=[], usage=usage).model_dump(mode="json"))
        yield sse_event("[DONE]")
    except ApiError as exc:
        yield sse_event(exc.openai_body())
    except Exception:  # the status line has gone out: report the failure in the stream itself
        log.exception("stream %s failed", head["id"])
        yield sse_event(ApiError(500, "internal_error", "generation failed").openai_body())


def _chunk(head: dict, choice: ChatChunkChoice) -> str:
    return sse_event(ChatCompletionChunk(**head, choices=[choice]).model_dump(mode="json"))


def _logprobs(tokens: list[Token]) -> ChatLogprobs:
    """OpenAI's chat logprobs for generated characters: each with its UTF-8 bytes and its alternatives."""
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **_entry(t.char, t.logprob), top_logprobs=[ChatTopLogprob(**_entry(*alt)) for alt in t.top or ()]
            )
            for t in tokens
        ]
    )


def _entry(char: str, logprob: float) -> dict[str, Any]:
    return {"token": char, "logprob": logprob, "bytes": list(char.encode("utf-8"))}
