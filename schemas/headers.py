"""Kafka header names of the contract and the event-type registry."""

from __future__ import annotations

from schemas.base import EventBase
from schemas.events import (
    CancelRequest,
    ChatRequest,
    ChatResponse,
    DeadLetter,
    DocumentIngest,
    EnrichedRequest,
    IngestResult,
    TokenChunk,
)

#: Names the event's model, e.g. `chat.request`; consumers may rely on the topic instead.
EVENT_TYPE_HEADER = "ragbus-event-type"
SCHEMA_VERSION_HEADER = "ragbus-schema-version"
#: W3C trace context (https://www.w3.org/TR/trace-context/) travels in these headers.
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
#: Set by ragbus's consumers on a record the Kafka client itself could not parse (e.g. a header
#: key that is not UTF-8); its value is the client's error. Decoding such a record fails as
#: `unreadable`. See `infra.kafka.unreadable`.
UNREADABLE_HEADER = "ragbus-unreadable"

EVENT_MODELS: dict[str, type[EventBase]] = {
    m.event_type: m
    for m in (
        ChatRequest,
        EnrichedRequest,
        ChatResponse,
        TokenChunk,
        DocumentIngest,
        IngestResult,
        DeadLetter,
        CancelRequest,
    )
}


def event_model(event_type: str) -> type[EventBase] | None:
    return EVENT_MODELS.get(event_type)
