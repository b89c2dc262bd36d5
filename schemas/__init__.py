"""ragbus's event contract: every part of the system imports its events and topic names from here.

Non-Python producers use the JSON Schema files in `schemas/json/` (`ragbus schemas export`).
"""

from schemas import limits
from schemas.base import (
    LANES,
    SCHEMA_VERSION,
    ErrorCode,
    ErrorInfo,
    EventBase,
    Lane,
    new_id,
    utcnow,
)
from schemas.events import (
    ChatMessage,
    ChatRequest,
    ChatResponse,
    Citation,
    DeadLetter,
    DocumentIngest,
    EnrichedRequest,
    IngestResult,
    IngestTimings,
    KafkaHeader,
    RetrievalOptions,
    RetrievedChunk,
    SamplingParams,
    StageTimings,
    TokenChunk,
    Usage,
)
from schemas.headers import EVENT_TYPE_HEADER, SCHEMA_VERSION_HEADER, event_model
from schemas.topics import DEFAULT_PREFIX, TOPICS, Topics, TopicSpec, dlq_name, spec_for_topic

__all__ = [
    "DEFAULT_PREFIX",
    "EVENT_TYPE_HEADER",
    "LANES",
    "SCHEMA_VERSION",
    "SCHEMA_VERSION_HEADER",
    "TOPICS",
    "ChatMessage",
    "ChatRequest",
    "ChatResponse",
    "Citation",
    "DeadLetter",
    "DocumentIngest",
    "EnrichedRequest",
    "ErrorCode",
    "ErrorInfo",
    "EventBase",
    "IngestResult",
    "IngestTimings",
    "KafkaHeader",
    "Lane",
    "RetrievalOptions",
    "RetrievedChunk",
    "SamplingParams",
    "StageTimings",
    "TokenChunk",
    "TopicSpec",
    "Topics",
    "Usage",
    "dlq_name",
    "event_model",
    "limits",
    "new_id",
    "spec_for_topic",
    "utcnow",
]
