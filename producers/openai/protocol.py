"""The subset of OpenAI's chat-completions and embeddings protocols that ragbus serves (gateway
and bulk jobs).

Every parameter of OpenAI's chat completions is in exactly one of three places, so none is
silently ignored: a field of ChatCompletionRequest (honoured: mapped onto the contract, or a hint
recorded in the request's metadata), `NEUTRAL_PARAMS` (accepted only at the value that changes
nothing, OpenAI's default), or neither (a 400 that names it). producers/openai/convert.py applies
the rules before the model validates the rest."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from schemas import limits


def _none(v: Any) -> bool:
    return v is None


def _number(expected: float) -> Callable[[Any], bool]:
    return lambda v: v is None or (isinstance(v, int | float) and not isinstance(v, bool) and v == expected)


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


def _one_of(*values: Any) -> Callable[[Any], bool]:
    # `==` per value, so that 0 and False (or 1 and True) are not taken for each other.
    return lambda v: any(v == x and type(v) is type(x) for x in values)


#: OpenAI chat-completions parameters ragbus has no engine support for, accepted only at their
#: neutral value (the one that asks for nothing): name → (is it neutral, the neutral value in words).
NEUTRAL_PARAMS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "presence_penalty": (_number(0), "0"),
    "frequency_penalty": (_number(0), "0"),
    "logit_bias": (_empty, "{}"),
    "tools": (_empty, "[]"),
    # Without tools, "auto" and "none" both mean: answer in text.
    "tool_choice": (_one_of(None, "none", "auto"), '"none"'),
    "parallel_tool_calls": (_one_of(None, True, False), "a boolean, with no tools"),
    "functions": (_empty, "[]"),
    "function_call": (_one_of(None, "none", "auto"), '"none"'),
    "audio": (_none, "null"),
    "modalities": (lambda v: v is None or v == ["text"], '["text"]'),
    "prediction": (_none, "null"),
    "store": (_one_of(None, False), "false"),
    "reasoning_effort": (_one_of(None, "none"), '"none"'),
    "moderation": (_none, "null"),
    "prompt_cache_options": (_empty, "{}"),
    "prompt_cache_retention": (_none, "null"),
    "verbosity": (_one_of(None, "medium"), '"medium"'),
    "service_tier": (_one_of(None, "auto", "default"), '"auto"'),
    "web_search_options": (_none, "null"),
}

#: The same for the fields of a message (what OpenAI clients echo back in assistant turns).
NEUTRAL_MESSAGE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_none, "null"),
    "tool_calls": (_empty, "[]"),
    "tool_call_id": (_none, "null"),
    "function_call": (_none, "null"),
    "refusal": (_none, "null"),
    "audio": (_none, "null"),
}

#: The same for `stream_options`.
NEUTRAL_STREAM_OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    # ragbus pads no stream chunks: obfuscation is off.
    "include_obfuscation": (_one_of(None, False), "false"),
}


#: `content` as OpenAPI documents it: the shapes served, rather than "any objects".
_CONTENT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                "required": ["text"],
            },
        },
    ]
}


class ChatCompletionMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    #: No "tool": ragbus serves no tools, so no conversation of its own has a tool result in it.
    role: Literal["system", "developer", "user", "assistant"]
    #: Text, or text parts (`{"type": "text", "text": ...}`, the only kind served; others are a 400).
    #: Required: every message ragbus reads is text (a null content comes with tool calls only).
    content: Annotated[str | list[dict[str, Any]], WithJsonSchema(_CONTENT_SCHEMA)]

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_parts(cls, value: Any) -> Any:
        # One clear error at `messages.[i].content` instead of one per member of the union.
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) for p in value):
            return value
        raise ValueError("must be a string or a list of content parts (objects)")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's name, description, schema and strict flag."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    name: str = Field(
        min_length=1, max_length=limits.JSON_SCHEMA_NAME_MAX, pattern=limits.JSON_SCHEMA_NAME_PATTERN
    )
    description: str | None = Field(default=None, max_length=limits.METADATA_VALUE_MAX)
    #: `schema` in JSON (the attribute would shadow pydantic's own `schema`). Absent: any JSON object.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    #: ragbus always constrains generation to the schema, so strict or not, the answer fits it.
    strict: bool | None = None


class ResponseFormatParam(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormatParam:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('`json_schema` comes with type "json_schema", and only with it')
        return self


class ChatCompletionRequest(BaseModel):
    """The parameters ragbus honours. Neutral-only parameters are checked and dropped before this
    model sees a body (producers/openai/convert.py); anything else is refused here too. Strict, as
    the request models all are: JSON `false` is not the seed 0 nor `"5"` the number 5 — a body that
    does not fit the documented schema is a 400, never quietly converted."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = "ragbus"
    messages: list[ChatCompletionMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    #: OpenAI's newer name for max_tokens; wins when both are sent.
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    #: Answers to sample for the prompt (choices); not with `stream`.
    #: Strict, as the neutral checks before them were: `true` is not the number 1, nor `0` false.
    n: StrictInt = Field(default=1, ge=1, le=limits.CHOICES_MAX)
    #: Per-token log probabilities in each choice (`top_logprobs` alternatives each); not with `stream`.
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=limits.TOP_LOGPROBS_MAX)
    #: Text, any JSON object, or JSON valid against a schema; enforced while the model generates.
    response_format: ResponseFormatParam | None = None
    #: End-user hints, recorded in the request's metadata (and so in the audit log).
    user: str | None = Field(default=None, max_length=limits.METADATA_VALUE_MAX)
    safety_identifier: str | None = Field(default=None, max_length=limits.METADATA_VALUE_MAX)
    #: OpenAI's own bounds: 16 pairs, keys up to 64 characters, values up to 512.
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    #: A cache-routing hint: ragbus's answer cache keys on the request itself, so it changes nothing.
    prompt_cache_key: str | None = Field(default=None, max_length=1024)

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for k, v in (value or {}).items():
            if not 1 <= len(k) <= 64 or len(v) > 512:
                raise ValueError("keys are 1 to 64 characters and values at most 512")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None
    refusal: list[TokenLogprobOut] | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None = "stop"
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    #: ragbus's own additions: numbered sources and stage timings.
    citations: list[dict[str, Any]] = Field(default_factory=list)
    ragbus: dict[str, Any] = Field(default_factory=dict)


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ragbus"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape: every refusal of the gateway is one of these."""

    error: ErrorDetail


_TEXT = {"type": "string", "minLength": 1, "maxLength": limits.QUESTION_MAX}
#: `input` as OpenAPI documents it: a text or a list of texts (token arrays are refused).
_EMBEDDING_INPUT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        _TEXT,
        {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": limits.EMBEDDING_INPUTS_MAX},
    ]
}


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings. `input` is checked by hand (producers/gateway/embeddings.py) so that a
    token array gets its own words; the rest refuses what it does not know."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: Annotated[Any, WithJsonSchema(_EMBEDDING_INPUT_SCHEMA)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    #: An end-user hint, as in chat completions; embeddings are not audited, so it is not kept.
    user: str | None = Field(default=None, max_length=limits.METADATA_VALUE_MAX)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    #: float: the numbers; base64: the little-endian float32 bytes, as OpenAI sends them.
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
