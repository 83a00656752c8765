"""The plan of a request: a validated body becomes engine jobs for one model.

Both /generate and /v1/completions go through here, so they share one meaning for every parameter:
a request with `n` samples is `n` jobs with seeds seed, seed + 1, ... (docs/ENGINE_INTERFACE.md).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from charrnn.model.constraints import Constraint, ConstraintError, choice_constraint, json_constraint, regex_constraint
from charrnn.model.decoding import DRY_SEQUENCE_BREAKERS, SamplingError, SamplingParams, Token, bias_index
from charrnn.model.generation import random_seed
from charrnn.model.vocab import UnknownCharactersError
from charrnn.service.engine.loading import LoadedModel
from charrnn.service.engine.scheduler import JobSpec
from charrnn.service.web.errors import ApiError
from charrnn.service.web.schemas import OpenAIRequest, SamplingFields
from charrnn.service.web.slots import slot


@dataclass(frozen=True)
class Plan:
    """What one prompt of a request asks for: `n` jobs (or `best_of`) that differ only in their seeds."""

    model: LoadedModel
    prompt_ids: tuple[int, ...]
    max_new_chars: int
    params: SamplingParams
    seed: int
    n: int
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    best_of: int | None = None  # samples drawn, of which the n best are answered (best_results)

    @property
    def samples(self) -> int:
        return self.best_of or self.n

    def specs(self, timeout: float) -> list[JobSpec]:
        """One JobSpec per sample; sample i draws from seed + i."""
        return [
            JobSpec(
                model=self.model.name,
                prompt_ids=self.prompt_ids,
                max_new_chars=self.max_new_chars,
                params=self.params,
                seed=self.seed + i,
                stop=self.stop,
                top_logprobs=self.top_logprobs,
                timeout=timeout,
                loaded=self.model,  # the prompt was encoded with this model's vocabulary: run exactly it
            )
            for i in range(self.samples)
        ]


def encode_prompt(loaded: LoadedModel, prompt: str, unknown: str, field_name: str = "prompt") -> tuple[int, ...]:
    """The prompt's character ids; unknown characters are a 422 that names them (unless dropped)."""
    try:
        return tuple(loaded.vocab.encode(prompt, unknown=unknown))  # type: ignore[arg-type]
    except UnknownCharactersError as exc:
        raise ApiError(422, "unknown_characters", str(exc), field_name) from None


# model.generation compares top_p with float32 probabilities, where a top_p below ~1e-45 rounds to 0
# and cuts every character (NaN probabilities). Any top_p below the likeliest character's probability
# (>= 1/vocabulary size) keeps exactly that one character, so raising tiny values to this floor
# changes no answer.
MIN_TOP_P = 1e-30


def request_params(
    body: SamplingFields,
    loaded: LoadedModel,
    constraint: Constraint | None = None,
    bias_by_char: bool = False,
) -> SamplingParams:
    """The request's SamplingParams for this model; an out-of-range value is a 422 naming its field.

    `logit_bias` keys are vocabulary indices (OpenAI's token ids); with `bias_by_char` (/generate) a
    one-character key is the character itself.
    """
    try:
        bias = {bias_index(loaded.vocab, key, bias_by_char): value for key, value in (body.logit_bias or {}).items()}
        return SamplingParams(
            temperature=float(body.temperature),
            top_k=body.top_k,
            top_p=max(float(body.top_p), MIN_TOP_P),
            presence_penalty=float(body.presence_penalty),
            frequency_penalty=float(body.frequency_penalty),
            logit_bias=bias,
            constraint=constraint,
            dry_multiplier=float(body.dry_multiplier),
            dry_base=float(body.dry_base),
            dry_allowed_length=body.dry_allowed_length,
            dry_penalty_last_n=body.dry_penalty_last_n,
            dry_sequence_breakers=(
                DRY_SEQUENCE_BREAKERS if body.dry_sequence_breakers is None else tuple(body.dry_sequence_breakers)
            ),
        )
    except SamplingError as exc:
        raise ApiError(422, "invalid_value", str(exc), exc.field) from None


def compile_constraint(loaded: LoadedModel, field_name: str, kind: str, value: Any) -> Constraint:
    """The constraint of `kind` ("regex", "choice" or "json") compiled for this model's vocabulary; a 422
    naming `field_name` when it is invalid, unsupported, unsatisfiable or too large."""
    build = {"regex": regex_constraint, "choice": choice_constraint, "json": json_constraint}[kind]
    try:
        # Compiling takes up to ~1 s of a worker's CPU (bounded in model/constraints.py): a few at a time.
        with slot("constraint", "the server is busy compiling other constraints; retry later"):
            return build(value, loaded.vocab.chars)
    except ConstraintError as exc:
        raise ApiError(422, "invalid_constraint", str(exc), field_name) from None


def best_results(plans: list[Plan], results: list[tuple[list[Token], str]]) -> list[tuple[list[Token], str]]:
    """Each plan's `n` answers out of its `best_of` samples (the results in submission order): the ones
    with the highest mean log-probability per character, best first (OpenAI's best_of)."""
    chosen: list[tuple[list[Token], str]] = []
    start = 0
    for plan in plans:
        mine = results[start : start + plan.samples]
        start += plan.samples
        if plan.samples == plan.n:
            chosen += mine
            continue
        ranked = sorted(range(len(mine)), key=lambda i: -_mean_logprob(mine[i][0]))
        chosen += [mine[i] for i in ranked[: plan.n]]
    return chosen


def _mean_logprob(tokens: list[Token]) -> float:
    return sum(t.logprob for t in tokens) / len(tokens) if tokens else float("-inf")


def choose_seed(seed: int | None) -> int:
    """The request's seed, or a fresh one (reported back so the answer can be reproduced)."""
    return random_seed() if seed is None else seed


def new_id(prefix: str = "gen") -> str:
    """A request id for the answer body."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def check_best_of(body: SamplingFields, stream: bool) -> None:
    """best_of answers after every sample has ended, so it cannot stream (as in OpenAI's API)."""
    if stream and body.samples() > body.n:
        raise ApiError(
            422, "invalid_value", "best_of > n cannot be streamed: the best are known only at the end", "best_of"
        )


def guided_constraint(loaded: LoadedModel, body: OpenAIRequest) -> Constraint | None:
    """vLLM's guided decoding: at most one of guided_regex, guided_choice and guided_json."""
    given = {
        kind: value
        for kind, value in (("regex", body.guided_regex), ("choice", body.guided_choice), ("json", body.guided_json))
        if value is not None
    }
    if len(given) > 1:
        message = f"give one of guided_regex, guided_choice and guided_json, not {' and '.join(given)}"
        raise ApiError(422, "invalid_value", message, f"guided_{list(given)[-1]}")
    for kind, value in given.items():
        return compile_constraint(loaded, f"guided_{kind}", kind, value)
    return None
