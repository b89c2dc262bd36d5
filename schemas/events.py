"""Every event that travels on a ragbus topic (pydantic v2; JSON on the wire)."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress, field_validator, model_validator

from schemas import limits
from schemas.base import B64Bytes, ErrorInfo, EventBase

Role = Literal["system", "user", "assistant"]
MetadataValue = Annotated[str, Field(max_length=limits.METADATA_VALUE_MAX)] | int | float | bool
#: Free-form metadata: bounded in keys, key length and string values.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=limits.METADATA_KEY_MAX)], MetadataValue],
    Field(max_length=limits.METADATA_KEYS_MAX),
]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Part):
    role: Role
    content: str = Field(max_length=limits.MESSAGE_CONTENT_MAX)


def _depth(value: Any) -> int:
    """How deeply `value` (decoded JSON) nests objects and arrays; iterative, so a hostile schema
    cannot exhaust the stack before it is refused."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


class ResponseFormat(_Part):
    """What shape the answer must have (OpenAI's `response_format`): free text, any JSON object, or
    JSON valid against `json_schema`. Engines enforce it while generating (a llama.cpp grammar,
    vLLM's structured outputs), so the answer parses; the schema is bounded in size and depth because
    every engine compiles it."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(
        default=None, max_length=limits.JSON_SCHEMA_NAME_MAX, pattern=limits.JSON_SCHEMA_NAME_PATTERN
    )
    description: str | None = Field(default=None, max_length=limits.METADATA_VALUE_MAX)
    json_schema: dict[str, Any] | None = Field(
        default=None, description="The JSON Schema (type json_schema)."
    )
    strict: bool = False

    @field_validator("json_schema")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if _depth(value) > limits.JSON_SCHEMA_DEPTH_MAX:
            raise ValueError(f"the schema nests deeper than {limits.JSON_SCHEMA_DEPTH_MAX} levels")
        if len(json.dumps(value, separators=(",", ":"))) > limits.JSON_SCHEMA_MAX:
            raise ValueError(f"the schema is longer than {limits.JSON_SCHEMA_MAX} characters as JSON")
        return value

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("a json_schema format carries `json_schema`, and no other type does")
        return self


class SamplingParams(_Part):
    max_tokens: int = Field(default=256, ge=1, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[Annotated[str, Field(max_length=limits.STOP_SEQUENCE_MAX)]] = Field(
        default_factory=list, max_length=limits.STOP_SEQUENCES_MAX
    )
    n: int = Field(default=1, ge=1, le=limits.CHOICES_MAX, description="Answers to sample for the prompt.")
    logprobs: bool = Field(default=False, description="Report each answer token's log probability.")
    top_logprobs: int = Field(
        default=0, ge=0, le=limits.TOP_LOGPROBS_MAX, description="Most likely alternatives per token."
    )
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _logprobs_bounded(self) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        if self.logprobs and logprob_entries(self) > limits.LOGPROB_ENTRIES_MAX:
            raise ValueError(
                f"n * max_tokens * (top_logprobs + 1) is at most {limits.LOGPROB_ENTRIES_MAX} with "
                "logprobs; ask for fewer tokens, choices or alternatives"
            )
        return self


def logprob_entries(sampling: SamplingParams) -> int:
    """The most logprob entries a response to `sampling` can carry."""
    return sampling.n * sampling.max_tokens * (sampling.top_logprobs + 1)


class RetrievalOptions(_Part):
    top_k: int | None = Field(default=None, ge=1, le=50, description="None: the processor's default.")
    hybrid: bool | None = Field(default=None, description="Dense + BM25 fused with RRF; None: default.")
    enabled: bool = Field(default=True, description="False: answer without retrieved context.")


class StageTimings(_Part):
    """Milliseconds spent in each stage of one request's trip through the bus."""

    retrieval_queue_ms: float | None = Field(
        default=None, description="Request created → retrieval picked it up."
    )
    retrieval_batch_ms: float | None = Field(default=None, description="Waiting for the micro-batch to fill.")
    embed_ms: float | None = None
    search_ms: float | None = None
    inference_queue_ms: float | None = Field(
        default=None, description="Enriched published → worker batch start."
    )
    generate_ms: float | None = Field(default=None, description="Time inside the model engine.")
    total_ms: float | None = Field(default=None, description="Request created → response published.")


class Usage(_Part):
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    total_tokens: int = Field(default=0, ge=0)


class RetrievedChunk(_Part):
    chunk_id: str
    doc_id: str
    text: str
    score: float
    source: str | None = None
    title: str | None = None


class Citation(_Part):
    index: int = Field(ge=1, description="The [n] marker used in the prompt and the answer.")
    doc_id: str
    chunk_id: str
    source: str | None = None
    title: str | None = None
    score: float


class TopLogprob(_Part):
    """One token and its log probability (natural log; -9999 stands for a probability of zero)."""

    token: str = Field(max_length=limits.TOKEN_TEXT_MAX)
    logprob: float = Field(ge=-9999.0, le=0.0)
    bytes: B64Bytes | None = Field(
        default=None,
        max_length=limits.TOKEN_TEXT_MAX,
        description="The token's UTF-8 bytes (a token may "
        "hold part of a character, which `token` cannot show).",
    )


class TokenLogprob(TopLogprob):
    """A generated token, with the most likely tokens at its position."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list, max_length=limits.TOP_LOGPROBS_MAX)


class AnswerChoice(_Part):
    """One of the answers sampled for a request (OpenAI's `choices[i]`)."""

    index: int = Field(ge=0, lt=limits.CHOICES_MAX)
    text: str
    finish_reason: Literal["stop", "length"] = "stop"
    logprobs: list[TokenLogprob] | None = Field(
        default=None, max_length=limits.LOGPROB_ENTRIES_MAX, description="Set when logprobs were asked for."
    )


class ChatRequest(EventBase):
    """A question, on `ragbus.<lane>.requests`."""

    event_type: ClassVar[str] = "chat.request"

    question: str = Field(min_length=1, max_length=limits.QUESTION_MAX)
    history: list[ChatMessage] = Field(default_factory=list, max_length=limits.HISTORY_MAX)
    system_prompt: str | None = Field(default=None, max_length=limits.SYSTEM_PROMPT_MAX)
    conversation_id: str | None = Field(default=None, max_length=limits.CONVERSATION_ID_MAX)
    model: str | None = Field(
        default=None,
        max_length=limits.MODEL_NAME_MAX,
        description="A served model name; None: the route table picks.",
    )
    stream: bool = Field(default=False, description="Also publish TokenChunk events as tokens arrive.")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    retrieval: RetrievalOptions = Field(default_factory=RetrievalOptions)
    job_id: str | None = Field(
        default=None, max_length=limits.JOB_ID_MAX, description="Bulk job this request belongs to."
    )
    custom_id: str | None = Field(
        default=None, max_length=limits.CUSTOM_ID_MAX, description="Caller's id inside a bulk job."
    )
    client_ip: IPvAnyAddress | None = None
    metadata: Metadata = Field(default_factory=dict)


class CancelRequest(EventBase):
    """Stop answering request `request_id`, on the tenant's `ragbus.t.<tenant>.chat.cancel` (chat and
    bulk lanes alike): its client went away, or its batch was cancelled. The worker stops the
    generation between decode steps (or skips the request when it arrives later) and answers it with
    a `cancelled` error, so the request is still answered, and audited, exactly once. Only the
    tenant's own topic cancels its requests: the topic, not `tenant_id`, says whose request it is."""

    event_type: ClassVar[str] = "chat.cancel"

    reason: str = Field(
        default="cancelled",
        min_length=1,
        max_length=limits.CANCEL_REASON_MAX,
        description="Why, in a few words (e.g. client_disconnected, batch_cancelled); shown in the answer.",
    )


class EnrichedRequest(EventBase):
    """A request with its retrieved context, on `ragbus.<lane>.enriched`."""

    event_type: ClassVar[str] = "chat.enriched"

    request: ChatRequest
    chunks: list[RetrievedChunk] = Field(default_factory=list)
    no_context: bool = Field(default=False, description="The tenant has no documents (or retrieval was off).")
    timings: StageTimings = Field(default_factory=StageTimings)


class ChatResponse(EventBase):
    """The final answer (or error) for a request, on `ragbus.<lane>.responses`."""

    event_type: ClassVar[str] = "chat.response"

    answer: str = ""
    citations: list[Citation] = Field(default_factory=list)
    model: str | None = None
    usage: Usage = Field(default_factory=Usage)
    timings: StageTimings = Field(default_factory=StageTimings)
    finish_reason: Literal["stop", "length", "error"] | None = None
    cached: bool = Field(default=False, description="Served from the response cache.")
    error: ErrorInfo | None = None
    conversation_id: str | None = None
    job_id: str | None = None
    custom_id: str | None = None
    choices: list[AnswerChoice] = Field(
        default_factory=list,
        max_length=limits.CHOICES_MAX,
        description="Every answer, when the request asked for n > 1 or logprobs (the first is `answer`); "
        "else empty, and `answer` is the one answer.",
    )

    @property
    def ok(self) -> bool:
        return self.error is None


class TokenChunk(EventBase):
    """Streamed piece of an answer, on `ragbus.chat.tokens`; the ChatResponse remains authoritative."""

    event_type: ClassVar[str] = "chat.token"

    index: int = Field(ge=0)
    text: str
    final: bool = False
    model: str | None = None


ContentType = Literal["text/plain", "text/markdown", "text/html", "application/pdf"]


class DocumentIngest(EventBase):
    """A document to (re)index or delete, on `ragbus.docs.ingest`."""

    event_type: ClassVar[str] = "docs.ingest"

    doc_id: str = Field(min_length=1, max_length=limits.DOC_ID_MAX)
    op: Literal["upsert", "delete"] = "upsert"
    content_type: ContentType = "text/plain"
    text: str | None = Field(default=None, description="The document as text (plain, Markdown, HTML).")
    data: B64Bytes | None = Field(default=None, description="Binary document (PDF), base64 in JSON.")
    source: str | None = Field(default=None, max_length=limits.SOURCE_MAX, description="File name or URI.")
    title: str | None = Field(default=None, max_length=limits.TITLE_MAX)
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_content(self) -> DocumentIngest:
        if self.op == "upsert" and self.text is None and self.data is None:
            raise ValueError("an upsert needs `text` or `data`")
        if self.content_type == "application/pdf" and self.op == "upsert" and self.data is None:
            raise ValueError("a PDF upsert carries its bytes in `data`")
        return self


class IngestTimings(_Part):
    parse_ms: float | None = None
    chunk_ms: float | None = None
    embed_ms: float | None = None
    upsert_ms: float | None = None
    total_ms: float | None = None


class IngestResult(EventBase):
    """Outcome of one DocumentIngest, on `ragbus.docs.ingested`."""

    event_type: ClassVar[str] = "docs.ingested"

    doc_id: str
    op: Literal["upsert", "delete"]
    status: Literal["ok", "error"]
    chunks: int = Field(default=0, ge=0)
    timings: IngestTimings = Field(default_factory=IngestTimings)
    error: ErrorInfo | None = None


class KafkaHeader(_Part):
    key: str
    value: B64Bytes | None = None


class DeadLetter(EventBase):
    """A message a stage could not process, on `<source topic>.dlq`, with the original bytes."""

    event_type: ClassVar[str] = "dead_letter"

    # The original may not have parsed, so the envelope is best-effort here: salvaged fields are
    # cut to the contract's limits (ending in `schemas.limits.CUT_MARK` when cut), never refused.
    tenant_id: str = Field(default="unknown", min_length=1, max_length=limits.TENANT_ID_MAX)

    source_topic: str
    source_partition: int = Field(ge=0)
    source_offset: int = Field(ge=0)
    source_timestamp_ms: int | None = None
    original_key: B64Bytes | None = None
    original_value: B64Bytes | None = None
    original_size: int | None = Field(default=None, ge=0, description="Bytes of the original value.")
    original_truncated: bool = Field(
        default=False,
        description="The echoed key, value or headers are cut (see `schemas.limits`); sizes are exact.",
    )
    original_headers: list[KafkaHeader] = Field(default_factory=list)
    error_class: str = Field(
        max_length=limits.ERROR_CLASS_MAX,
        description="Why: a decode class (empty, too_large, invalid_utf8, not_json, wrong_event_type, "
        "unsupported_version, schema_validation) or a processing class (see the README's Dead letters).",
    )
    error_message: str = Field(max_length=limits.ERROR_MESSAGE_MAX)
    stage: str = Field(description="The consumer group or component that gave up on the message.")
