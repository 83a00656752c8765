"""Request and response bodies as pydantic models; they validate requests and generate /openapi.json.

Requests are strict (a string is never read as a number, a bool never as an integer) and forbid
unknown fields. The limits that are configuration (prompt length, max_new_chars, n) are checked
against the `ServiceConfig` passed as validation context, so the schema's static bounds are the
hard ones (service/config.py) and /openapi.json reports the configured ones: a field limited by a
setting says which with `configured(setting)`, and service/web/openapi.py writes that setting's value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from charrnn.model.constraints import MAX_PATTERN_CHARS
from charrnn.model.copies import DEFAULT_MIN_CHARS, MAX_MIN_CHARS
from charrnn.model.decoding import (
    DRY_SEQUENCE_BREAKERS,
    MAX_DRY_ALLOWED_LENGTH,
    MAX_DRY_BASE,
    MAX_DRY_BREAKER_CHARS,
    MAX_DRY_BREAKERS,
    MAX_DRY_MULTIPLIER,
    MAX_DRY_PENALTY_LAST_N,
    MAX_LOGIT_BIAS,
    MAX_PENALTY,
)
from charrnn.service.config import (
    MAX_LAYER_INDEX,
    MAX_PROMPTS,
    MAX_SAMPLES,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    TOP_LOGPROBS,
)

__all__ = ["MAX_SEED", "MAX_STOP_CHARS", "MAX_STOP_STRINGS", "SETTING_KEY", "TOP_LOGPROBS", "configured"]

MAX_SEED = 2**63 - 1
# In a field's JSON schema: the setting whose value is this field's configured limit (replaced in /openapi.json)
SETTING_KEY = "x-charrnn-setting"


def configured(setting: str) -> dict[str, str]:
    """A field's `json_schema_extra`: its limit is the ServiceConfig setting `setting` (maximum, maxLength
    or maxItems, by the field's type), which the OpenAPI document states."""
    return {SETTING_KEY: setting}


StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]  # vocabulary indices
PromptList = Annotated[list[str | TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
MAX_BIASES = 1024  # logit_bias entries (a vocabulary is rarely larger)
MAX_CHOICES = 1024  # options of a choice constraint
Bias = Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]
DryBreaker = Annotated[str, StringConstraints(min_length=1, max_length=MAX_DRY_BREAKER_CHARS)]
RegexPattern = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATTERN_CHARS)]
ChoiceList = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATTERN_CHARS)]],
    Field(min_length=1, max_length=MAX_CHOICES),
]


def _listed(value: Any) -> Any:
    """One string stands for a list of one (so that errors name list items, never union branches)."""
    return [value] if isinstance(value, str) else value


def _listed_prompts(value: Any) -> Any:
    """As OpenAI's API: a string, a list of strings, one list of token ids, or a list of such lists."""
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [value]
    return _listed(value)


# A string or a list of strings, validated as the list.
StopStrings = Annotated[StopList, BeforeValidator(_listed, json_schema_input_type=StopString | StopList)]
Prompts = Annotated[PromptList, BeforeValidator(_listed_prompts, json_schema_input_type=str | TokenIds | PromptList)]


class StrictModel(BaseModel):
    """A request body: strict types, no unknown fields, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ResponseModel(BaseModel):
    """A response body: exactly these fields."""

    model_config = ConfigDict(extra="forbid")


def _check_limit(info: ValidationInfo, setting: str, value: int, what: str) -> None:
    """Raise if `value` is over the configured limit `setting` (when validating with a config)."""
    config = (info.context or {}).get("config")
    limit = getattr(config, setting, None)
    if limit is not None and value > limit:
        raise ValueError(f"must be at most {limit} {what} on this server, got {value}")


def _capped_default(data: Any, info: ValidationInfo, field: str, default: int) -> Any:
    """Fill a missing length field with its default, lowered to the server's limit if that is smaller."""
    config = (info.context or {}).get("config")
    if isinstance(data, dict) and field not in data and config is not None:
        return data | {field: min(default, config.max_new_chars)}
    return data


class SamplingFields(StrictModel):
    """The sampling fields shared by /generate and /v1/completions."""

    temperature: float = Field(0.8, ge=0.0, le=5.0, description="0 is greedy (always the likeliest character)")
    top_k: int | None = Field(None, ge=1, description="sample only from the k likeliest characters; null: all")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: the smallest set holding this mass")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="the same request with the same seed gives the same text"
    )
    n: int = Field(
        1,
        ge=1,
        le=MAX_SAMPLES,
        description="independent samples; sample i uses seed + i",
        json_schema_extra=configured("max_n"),
    )
    unknown_chars: Literal["error", "drop"] = Field(
        "error", description="prompt characters the model does not know: reject the request, or drop them"
    )
    best_of: int | None = Field(
        None,
        ge=1,
        le=MAX_SAMPLES,
        description="draw this many samples (seeds seed, seed + 1, ...) and return the n with the highest mean "
        "log-probability per character, best first; at least n; not with stream",
        json_schema_extra=configured("max_n"),
    )
    presence_penalty: float = Field(
        0.0,
        ge=-MAX_PENALTY,
        le=MAX_PENALTY,
        description="subtracted from a character's logit once it has been generated in this sample (OpenAI's meaning)",
    )
    frequency_penalty: float = Field(
        0.0,
        ge=-MAX_PENALTY,
        le=MAX_PENALTY,
        description="subtracted from a character's logit for each time it has been generated in this sample",
    )
    logit_bias: dict[str, Bias] | None = Field(
        None,
        max_length=MAX_BIASES,
        description="added to characters' logits before sampling (-100 bans, 100 forces): keys are vocabulary "
        "indices as in OpenAI's API (see POST /tokenize)",
    )
    dry_multiplier: float = Field(
        0.0,
        ge=0.0,
        le=MAX_DRY_MULTIPLIER,
        description="DRY repetition penalty (llama.cpp's meaning): a character that would extend a repeat of n >= "
        "dry_allowed_length characters loses dry_multiplier * dry_base ** (n - dry_allowed_length) from its logit; "
        "0 is off",
    )
    dry_base: float = Field(1.75, gt=1.0, le=MAX_DRY_BASE, description="DRY: how fast the penalty grows with length")
    dry_allowed_length: int = Field(
        2, ge=1, le=MAX_DRY_ALLOWED_LENGTH, description="DRY: the longest repeat that goes unpenalised"
    )
    dry_penalty_last_n: int = Field(
        -1,
        ge=-1,
        le=MAX_DRY_PENALTY_LAST_N,
        description="DRY: how many of the latest characters (prompt and generated text) are searched for repeats; "
        "-1 all of them, 0 none (DRY off), as in llama.cpp",
    )
    dry_sequence_breakers: list[DryBreaker] | None = Field(
        None,
        max_length=MAX_DRY_BREAKERS,
        description="DRY: strings a repeat never spans (each matched as a whole); null: "
        + ", ".join(map(repr, DRY_SEQUENCE_BREAKERS)).replace("'", '"'),
    )

    @field_validator("n")
    @classmethod
    def _n_limit(cls, value: int, info: ValidationInfo) -> int:
        _check_limit(info, "max_n", value, "samples")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            if value < info.data.get("n", 1):
                raise ValueError(f"must be at least n ({info.data.get('n')}), got {value}")
            _check_limit(info, "max_n", value, "samples")
        return value

    def samples(self) -> int:
        """Samples drawn per prompt: best_of, or n."""
        return self.best_of or self.n


class RegexGrammar(StrictModel):
    """The generated text matches a regular expression (Python syntax, no anchors or lookarounds)."""

    type: Literal["regex"]
    value: RegexPattern


class ChoiceGrammar(StrictModel):
    """The generated text is one of these strings."""

    type: Literal["choice"]
    value: ChoiceList


class JsonGrammar(StrictModel):
    """The generated text is JSON valid under this JSON schema (turned into a pattern by outlines-core)."""

    type: Literal["json"]
    value: dict[str, Any]


Grammar = Annotated[RegexGrammar | ChoiceGrammar | JsonGrammar, Field(discriminator="type")]


class CopiesOption(StrictModel):
    """Ask for the spans of each choice that stand verbatim in the model's training text."""

    min_chars: int = Field(
        DEFAULT_MIN_CHARS,
        ge=1,
        le=MAX_MIN_CHARS,
        description=f"the shortest span reported (default {DEFAULT_MIN_CHARS}); every reported span is maximal",
    )


def _copies_option(value: Any) -> Any:
    """`true` stands for the default option and `false` for none (so that errors name copies.min_chars, never a
    union branch)."""
    if value is True:
        return {}
    return None if value is False else value


Copies = Annotated[
    CopiesOption | None, BeforeValidator(_copies_option, json_schema_input_type=bool | CopiesOption | None)
]


class GenerateRequest(SamplingFields):
    """POST /generate."""

    prompt: str = Field(
        "", description="text to continue; may be empty", json_schema_extra=configured("max_prompt_chars")
    )
    max_new_chars: int = Field(
        200,
        ge=1,
        description="characters to generate at most (default 200, or the server's limit if lower)",
        json_schema_extra=configured("max_new_chars"),
    )
    stop: StopStrings = Field(
        default_factory=list,
        description=f"up to {MAX_STOP_STRINGS} strings; generation ends when one appears (it is not returned)",
    )
    model: str | None = Field(None, description="a name from GET /models; null: the default model")
    logprobs: bool = Field(
        False, description=f"per generated character, its log-probability and {TOP_LOGPROBS} alternatives"
    )
    stream: bool = Field(False, description="answer with Server-Sent Events as the characters are generated")
    grammar: Grammar | None = Field(
        None,
        description="constrained generation, as TGI: {type: regex, value: PATTERN}, {type: choice, value: [...]} "
        "or {type: json, value: SCHEMA}; the text always matches (a prefix of a match if max_new_chars ends it "
        "first)",
    )
    logit_bias: dict[str, Bias] | None = Field(
        None,
        max_length=MAX_BIASES,
        description="added to characters' logits before sampling (-100 bans, 100 forces), keyed by the character "
        "itself; a key of two or more digits is a vocabulary index, as in /v1/completions",
    )
    copies: Copies = Field(
        None,
        description=f"true or {{min_chars: N}}: each choice lists its spans of at least N (default "
        f"{DEFAULT_MIN_CHARS}) characters that stand verbatim in the model's training text (a 422 for a model "
        "without a copy index)",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_length(cls, data: Any, info: ValidationInfo) -> Any:
        return _capped_default(data, info, "max_new_chars", 200)

    def copies_min_chars(self) -> int | None:
        """The shortest copied span asked for, or None when copies are not asked for."""
        return None if self.copies is None else self.copies.min_chars

    @field_validator("prompt")
    @classmethod
    def _prompt_limit(cls, value: str, info: ValidationInfo) -> str:
        _check_limit(info, "max_prompt_chars", len(value), "characters")
        return value

    @field_validator("max_new_chars")
    @classmethod
    def _max_new_chars_limit(cls, value: int, info: ValidationInfo) -> int:
        _check_limit(info, "max_new_chars", value, "characters")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple, whether it was given as one string or a list."""
        return tuple(self.stop)


# -- /generate responses --------------------------------------------------------------------------------


class Alternative(ResponseModel):
    """One of the likeliest characters at a position, with its log-probability."""

    char: str
    logprob: float


class CharLogprob(ResponseModel):
    """One generated character, its log-probability under the model, and the likeliest alternatives."""

    char: str
    logprob: float
    top: list[Alternative]


FinishReason = Literal["length", "stop", "deadline"]


class CopySpan(ResponseModel):
    """text[start:end] of a choice stands verbatim in the training text from `offset` on (characters)."""

    start: int
    end: int
    offset: int = Field(
        description="a character offset into the training text (the corpus the model card names) where the span stands"
    )


class Choice(ResponseModel):
    """One sample of a /generate answer."""

    index: int
    text: str
    finish_reason: FinishReason = Field(
        description="length: max_new_chars reached; stop: a stop string appeared; deadline: the server's time limit"
    )
    logprobs: list[CharLogprob] | None = Field(None, description="present when the request asked for logprobs")
    copies: list[CopySpan] | None = Field(None, description="present when the request asked for copies")


class Usage(ResponseModel):
    """Characters read (the prompt, after dropping unknown ones) and generated (all samples)."""

    prompt_chars: int
    generated_chars: int


class GenerateResponse(ResponseModel):
    """The answer of POST /generate (without `stream`)."""

    id: str
    model: str
    choices: list[Choice]
    usage: Usage
    seed: int = Field(description="the seed of sample 0; send it back to reproduce this answer")


class StreamChunk(ResponseModel):
    """`event: chunk`: characters of one sample, as soon as they are generated."""

    index: int
    text: str
    logprobs: list[CharLogprob] | None = None


class StreamChoiceEnd(ResponseModel):
    """How one sample of a stream ended."""

    index: int
    finish_reason: FinishReason
    copies: list[CopySpan] | None = Field(None, description="present when the request asked for copies")


class StreamDone(ResponseModel):
    """`event: done`: the last event of a stream."""

    id: str
    model: str
    choices: list[StreamChoiceEnd]
    usage: Usage
    seed: int


# -- /inspect ------------------------------------------------------------------------------------------


class InspectRequest(StrictModel):
    """POST /inspect."""

    text: str = Field(
        min_length=1,
        description="the text the model reads, from a zero state",
        json_schema_extra=configured("max_inspect_chars"),
    )
    model: str | None = Field(None, description="a name from GET /models; null: the default model")
    layer: int | None = Field(
        None, ge=0, le=MAX_LAYER_INDEX, description="recurrent layer, 0 = the lowest; null: the top one"
    )
    unknown_chars: Literal["error", "drop"] = Field(
        "error", description="characters the model does not know: reject the request, or drop them"
    )

    @field_validator("text")
    @classmethod
    def _text_limit(cls, value: str, info: ValidationInfo) -> str:
        _check_limit(info, "max_inspect_chars", len(value), "characters")
        return value


class CellCorrelation(ResponseModel):
    """A cell and the Pearson correlation of its activations with a feature, over the text."""

    cell: int
    correlation: float = Field(ge=-1.0, le=1.0)


class FeatureCells(ResponseModel):
    """A simple feature of the text and the cells whose activity best follows it."""

    name: str = Field(description="in_double_quotes, in_single_quotes, line_start, in_brackets or position_in_line")
    description: str
    values: list[int] = Field(description="the feature at each character, once that character has been read")
    cells: list[CellCorrelation] = Field(
        description="up to 5 cells by absolute correlation, strongest first; empty when the feature is constant"
    )


class InspectResponse(ResponseModel):
    """The answer of POST /inspect: one layer's cells, character by character."""

    model: str
    cell: Literal["lstm", "gru", "rnn"] = Field(description="the model's recurrent cell type")
    layer: int
    layers: int
    hidden: int = Field(description="cells in the layer")
    quantity: Literal["tanh(c)", "h"] = Field(
        description="what a value is: tanh of an LSTM's cell state, or the hidden state of a GRU or RNN"
    )
    chars: list[str] = Field(description="the characters read (unknown ones dropped if asked)")
    activations: list[list[float]] = Field(
        description="activations[i][j]: cell j after reading character i, in [-1, 1], rounded to 3 decimals"
    )
    features: list[FeatureCells]


# -- other native endpoints ---------------------------------------------------------------------------


class ModelInfo(ResponseModel):
    """One checkpoint of the model directory; the network's fields are absent when it failed to load."""

    name: str
    file: str
    status: Literal["loaded", "failed"] = Field(
        description="loaded: served; failed: not served (a file that failed to load never replaces a served model)"
    )
    error: str | None = Field(
        None,
        description="why the file failed to load; with status loaded, the file now in the directory failed and "
        "the model loaded earlier from that name is still served",
    )
    cell: str | None = None
    layers: int | None = None
    hidden: int | None = None
    embed: int | None = None
    vocab_size: int | None = None
    parameters: int | None = None
    steps: int | None = None
    val_loss: float | None = Field(None, description="validation loss in nats per character")
    corpus: str | None = None
    copies: bool | None = Field(None, description="whether /generate can report copies (the model has a copy index)")
    copies_error: str | None = Field(
        None, description="why the model cannot report copies (no copy index, or one that would not open)"
    )


class ModelsResponse(ResponseModel):
    """GET /models: the default model's name and every checkpoint found, as the worker answering serves them."""

    default: str | None = Field(None, description="served when a request names no model; absent when none is loaded")
    models: list[ModelInfo]
    worker: int = Field(description="the process id of the worker that answered (each worker reloads on its own)")
    checked_at: float = Field(description="when this worker last checked the model directory (Unix seconds)")


class ReloadChange(ResponseModel):
    """What a check did to one model name."""

    name: str
    kind: Literal["added", "replaced", "removed", "failed"]
    error: str | None = Field(None, description="why the file failed to load (kind failed)")


class ReloadResponse(ResponseModel):
    """POST /admin/reload: what the check in the worker that answered found; the others check within seconds."""

    worker: int = Field(description="the process id of the worker that checked")
    changes: list[ReloadChange]
    seconds: float = Field(description="how long the check took")
    models: list[str] = Field(description="the models this worker serves now")
    error: str | None = Field(None, description="the model directory itself could not be read (nothing changed)")


class HealthResponse(ResponseModel):
    """GET /health: readiness; per-model checks and the engine's load unless keys are set and none was sent."""

    status: Literal["ok", "unavailable"]
    models: dict[str, str] | None = Field(
        default=None, description="per loaded model: ok, or why it is not known to generate"
    )
    queue_depth: int | None = None
    active: int | None = None


class ErrorDetail(ResponseModel):
    """A machine-readable code, a message for people, and the request field at fault if any."""

    code: str
    message: str
    field: str | None = None
    request_id: str | None = Field(None, description="the request's id, as in its X-Request-Id header")


class ErrorResponse(ResponseModel):
    """Every native error."""

    error: ErrorDetail


# -- OpenAI-compatible ----------------------------------------------------------------------------------


class StreamOptions(StrictModel):
    """OpenAI's stream options: `include_usage` adds a last chunk with the usage."""

    include_usage: bool = False


def _null_means_default(schema: dict[str, Any]) -> None:
    """Document that every field may be null (it then takes its default), as the validator below reads it."""
    for name, field in schema.get("properties", {}).items():
        if name in schema.get("required", ()):  # a required field has no default to stand for
            continue
        variants = field.get("anyOf", [field])
        if not any(variant.get("type") == "null" for variant in variants):
            keep = {key: field.pop(key) for key in ("title", "description", "default") if key in field}
            schema["properties"][name] = {"anyOf": [field, {"type": "null"}], **keep}


class OpenAIRequest(SamplingFields):
    """The fields /v1/completions and /v1/chat/completions share, with OpenAI's names and defaults; as in
    OpenAI's API, null stands for a field's default."""

    model_config = ConfigDict(json_schema_extra=_null_means_default)

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    stop: StopStrings | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")
    guided_regex: RegexPattern | None = Field(
        None, description="as vLLM: the generated text matches this regular expression (Python syntax)"
    )
    guided_choice: ChoiceList | None = Field(None, description="as vLLM: the generated text is one of these")
    guided_json: dict[str, Any] | str | None = Field(
        None, description="as vLLM: the generated text is JSON valid under this JSON schema"
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any, info: ValidationInfo) -> Any:
        """Null is the default; then the request's own defaults (its length, which the server may cap)."""
        if isinstance(data, dict):
            # Only known fields: an unknown one stays, null or not, so that it is refused.
            data = {key: value for key, value in data.items() if value is not None or key not in cls.model_fields}
        return cls._default_length(data, info)

    @classmethod
    def _default_length(cls, data: Any, info: ValidationInfo) -> Any:
        """`data` with the length field filled in when it is missing (each request names its own)."""
        return data

    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple (empty for None)."""
        return tuple(self.stop or ())


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions, as OpenAI's legacy completions API; `max_tokens` counts characters."""

    prompt: Prompts = Field(
        default_factory=lambda: [""],
        description="a string, a list of vocabulary indices (a token is one character; see POST /tokenize), "
        f"or a list of up to {MAX_PROMPTS} of either",
    )
    max_tokens: int = Field(
        16,
        ge=0,
        description="characters to generate at most; 0 (with `echo`) only scores the prompt",
        json_schema_extra=configured("max_new_chars"),
    )
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS, description="alternatives per character")
    echo: bool = Field(
        False,
        description="return the prompt before the generated text; with `logprobs`, the prompt's characters' "
        "log-probabilities too (the first one's is null: nothing comes before it)",
    )

    @classmethod
    def _default_length(cls, data: Any, info: ValidationInfo) -> Any:
        return _capped_default(data, info, "max_tokens", 16)

    @field_validator("prompt")
    @classmethod
    def _prompt_limit(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for prompt in value:
            _check_limit(info, "max_prompt_chars", len(prompt), "characters")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_limit(cls, value: int, info: ValidationInfo) -> int:
        _check_limit(info, "max_new_chars", value, "characters")
        return value

    def prompts(self) -> list[str | list[int]]:
        """`prompt` as a list of strings or lists of vocabulary indices."""
        return list(self.prompt)


class OpenAILogprobs(BaseModel):
    """OpenAI's legacy logprobs object; a token is one character."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null only for the first character of an echoed prompt")
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One choice of a completion (choice index = prompt index * n + sample)."""

    index: int
    text: str
    logprobs: OpenAILogprobs | None = None
    finish_reason: Literal["length", "stop"] | None = None


class CompletionUsage(BaseModel):
    """Tokens are characters."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """POST /v1/completions answer, and each chunk of its stream."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


# -- OpenAI chat ---------------------------------------------------------------------------------------

DEFAULT_REPLY_CHARS = 200  # a reply's length when the request gives none (or the server's limit if lower)


class TextPart(StrictModel):
    """A part of a message's content; only text parts exist for a character model."""

    type: Literal["text"]
    text: str


def _text_content(value: Any) -> Any:
    """A message's content as one string: a string, or its text parts joined as written; anything else
    (an image, an audio part, null) is refused, naming what it is."""
    if isinstance(value, list) and all(_is_text_part(part) for part in value):
        return "".join(part["text"] for part in value)
    if isinstance(value, list):
        kinds = sorted({str(part.get("type")) for part in value if isinstance(part, dict)} - {"text"})
        got = f"a part of type {kinds[0]!r}" if kinds else "a list holding something else"
        raise ValueError(f'must be text: a string or a list of {{"type": "text", "text": ...}} parts, got {got}')
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise ValueError(f"must be text: a string or a list of text parts, got {got}")
    return value


def _is_text_part(part: Any) -> bool:
    return (
        isinstance(part, dict)
        and part.keys() == {"type", "text"}
        and part["type"] == "text"
        and isinstance(part["text"], str)
    )


MessageText = Annotated[str, BeforeValidator(_text_content, json_schema_input_type=str | list[TextPart])]


class ChatMessage(StrictModel):
    """One message of a conversation."""

    role: Literal["system", "user", "assistant"]
    content: MessageText = Field(description="a string, or a list of text parts (joined as written)")
    name: str | None = Field(None, description="accepted and ignored: the model card's template names the speakers")


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions, as OpenAI's chat API: the model card's chat template renders `messages`
    into a prompt (docs/SERVICE.md), and the reply is the model's continuation; a token is one character."""

    messages: list[ChatMessage] = Field(
        min_length=1, description="the conversation, oldest first: roles system, user and assistant"
    )
    max_completion_tokens: int | None = Field(
        None,
        ge=1,
        description=f"characters of the reply at most (default {DEFAULT_REPLY_CHARS}, or the server's limit if lower)",
        json_schema_extra=configured("max_new_chars"),
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="the older name of max_completion_tokens, which wins when both are given",
        json_schema_extra=configured("max_new_chars"),
    )
    logprobs: bool = Field(False, description="each reply character's log-probability")
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=TOP_LOGPROBS,
        description="alternatives per character, with each's log-probability; needs logprobs",
    )

    @classmethod
    def _default_length(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and "max_tokens" in data:
            return data
        return _capped_default(data, info, "max_completion_tokens", DEFAULT_REPLY_CHARS)

    @field_validator("max_completion_tokens", "max_tokens")
    @classmethod
    def _length_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            _check_limit(info, "max_new_chars", value, "characters")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value

    def length(self) -> int:
        """Characters of each reply at most: max_completion_tokens, else max_tokens, else the default."""
        return next((v for v in (self.max_completion_tokens, self.max_tokens) if v is not None), DEFAULT_REPLY_CHARS)

    def length_field(self) -> str:
        """The field that set the length, to name in an error."""
        return (
            "max_tokens"
            if self.max_completion_tokens is None and self.max_tokens is not None
            else "max_completion_tokens"
        )

    def alternatives(self) -> int:
        """Logprob alternatives per character (0 without logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else 0

    def conversation(self) -> list[tuple[str, str]]:
        """The messages as (role, text) pairs, as a chat template renders them."""
        return [(message.role, message.content) for message in self.messages]


class ChatReply(BaseModel):
    """The assistant's message."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatTopLogprob(BaseModel):
    """A character and its log-probability; `bytes` is its UTF-8 encoding."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    """A reply character with the likeliest alternatives at its position (as many as top_logprobs asked)."""

    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    """OpenAI's chat logprobs: one entry per character of the reply."""

    content: list[ChatTokenLogprob] | None


ChatFinishReason = Literal["length", "stop"]


class ChatChoice(BaseModel):
    """One reply (index = sample)."""

    index: int
    message: ChatReply
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason


class ChatCompletionResponse(BaseModel):
    """POST /v1/chat/completions answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """What a stream chunk adds to a reply: the role (first chunk), then content; fields not sent are left out."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _sent_only(self, handler: SerializerFunctionWrapHandler):  # no return type: the JSON schema stays the model's
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    """One reply's piece in a stream chunk; `finish_reason` is set on its last chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion; with stream_options.include_usage a last one has the usage
    and no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class OpenAIModel(BaseModel):
    """A loaded model, as OpenAI describes one."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "charrnn"


class OpenAIModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorDetail(BaseModel):
    """OpenAI's error fields: `param` names the request field at fault, `code` is this service's code."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None
    request_id: str | None = Field(None, description="the request's id, as in its X-Request-Id header")


class OpenAIErrorResponse(BaseModel):
    """Every error under /v1/."""

    error: OpenAIErrorDetail


# -- exact scoring and the tokenizer endpoints (vLLM's shapes) ------------------------------------------


class ScoreRequest(StrictModel):
    """POST /score."""

    text: str = Field(
        min_length=1,
        description="the text to score, character by character",
        json_schema_extra=configured("max_prompt_chars"),
    )
    context: str = Field(
        "",
        description="read before `text` and not scored; empty: the text starts after a newline, as generation does",
        json_schema_extra=configured("max_prompt_chars"),
    )
    model: str | None = Field(None, description="a name from GET /models; null: the default model")
    top_logprobs: int = Field(0, ge=0, le=TOP_LOGPROBS, description="alternatives to list per character")
    unknown_chars: Literal["error", "drop"] = Field(
        "error", description="characters the model does not know: reject the request, or drop them"
    )

    @field_validator("text", "context")
    @classmethod
    def _length_limit(cls, value: str, info: ValidationInfo) -> str:
        _check_limit(info, "max_prompt_chars", len(value), "characters")
        return value


class ScoreResponse(ResponseModel):
    """The answer of POST /score: each character's log-probability (nats) under the model, and their sum."""

    model: str
    logprobs: list[CharLogprob] = Field(description="one per scored character; `top` lists the alternatives asked for")
    total_logprob: float = Field(description="the log-probability of the whole text (nats)")
    nats_per_char: float = Field(description="mean negative log-probability per character, as training reports loss")
    bits_per_char: float


class TokenizeRequest(StrictModel):
    """POST /tokenize, as vLLM's: a token is one character, its id the vocabulary index."""

    prompt: str = Field(
        description="the text to turn into vocabulary indices", json_schema_extra=configured("max_prompt_chars")
    )
    model: str | None = Field(None, description="a name from GET /models; null: the default model")
    add_special_tokens: bool = Field(True, description="accepted and ignored: a character model has no special tokens")
    return_token_strs: bool = Field(False, description="also return each token's text (its character)")

    @field_validator("prompt")
    @classmethod
    def _prompt_limit(cls, value: str, info: ValidationInfo) -> str:
        _check_limit(info, "max_prompt_chars", len(value), "characters")
        return value


class TokenizeResponse(ResponseModel):
    """The answer of POST /tokenize."""

    count: int
    max_model_len: int = Field(description="the longest prompt this server reads, in characters")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictModel):
    """POST /detokenize: vocabulary indices back to text."""

    tokens: list[Annotated[int, Field(ge=0)]] = Field(
        description="vocabulary indices", json_schema_extra=configured("max_prompt_chars")
    )
    model: str | None = Field(None, description="a name from GET /models; null: the default model")

    @field_validator("tokens")
    @classmethod
    def _tokens_limit(cls, value: list[int], info: ValidationInfo) -> list[int]:
        _check_limit(info, "max_prompt_chars", len(value), "tokens")
        return value


class DetokenizeResponse(ResponseModel):
    """The answer of POST /detokenize."""

    prompt: str


class TokenizerInfoResponse(ResponseModel):
    """GET /tokenizer_info: what a client needs to tokenize locally (the vocabulary is the alphabet)."""

    model: str
    tokenizer_class: Literal["CharacterVocabulary"] = "CharacterVocabulary"
    vocab_size: int
    vocab: list[str] = Field(description="the characters, in index order (by code point)")
    eos_token: str = Field(description="the character a text restarts after: a newline, where the vocabulary has one")
    bos_token: str | None = None
    pad_token: str | None = None
    model_max_length: int = Field(description="the longest prompt this server reads, in characters")


def dump(model: BaseModel) -> dict[str, Any]:
    """A response model as JSON-ready data, optional fields left out when unset."""
    return model.model_dump(mode="json", exclude_none=True)
