"""Fields every ragbus event carries, and the small value types shared between events."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)

from schemas import limits

SCHEMA_VERSION = 1

Lane = Literal["chat", "bulk"]
LANES: tuple[Lane, ...] = ("chat", "bulk")


def _from_base64(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"not valid base64: {e}") from None
    return value


#: Raw bytes in Python, a base64 string in JSON.
B64Bytes = Annotated[
    bytes,
    BeforeValidator(_from_base64),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class ErrorCode(StrEnum):
    """Machine-readable reasons a request was not answered normally."""

    INVALID_REQUEST = "invalid_request"
    CONTEXT_OVERFLOW = "context_overflow"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNKNOWN_MODEL = "unknown_model"
    RETRIEVAL_ERROR = "retrieval_error"
    ENGINE_ERROR = "engine_error"
    INGEST_ERROR = "ingest_error"
    UNAUTHORIZED = "unauthorized"
    CANCELLED = "cancelled"
    INTERNAL_ERROR = "internal_error"


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: ErrorCode
    message: str = Field(
        max_length=limits.ERROR_MESSAGE_MAX,
        description="Human-readable explanation, safe to show to the requester.",
    )


class EventBase(BaseModel):
    """Envelope fields of every event on a ragbus topic.

    `event_id` is unique per event; `request_id` ties together every event that one
    request causes (request, enriched request, tokens, response, dead letters).
    """

    model_config = ConfigDict(extra="forbid", frozen=False, populate_by_name=True)

    #: The value written to the `ragbus-event-type` Kafka header; set by each subclass.
    event_type: ClassVar[str] = "event"

    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    event_id: str = Field(default_factory=new_id, min_length=1, max_length=limits.EVENT_ID_MAX)
    request_id: str = Field(default_factory=new_id, min_length=1, max_length=limits.REQUEST_ID_MAX)
    tenant_id: str = Field(min_length=1, max_length=limits.TENANT_ID_MAX, pattern=limits.TENANT_ID_PATTERN)
    user_id: str = Field(default="anonymous", min_length=1, max_length=limits.USER_ID_MAX)
    lane: Lane = "chat"
    created_at: AwareDatetime = Field(default_factory=utcnow)
    deadline: AwareDatetime | None = Field(
        default=None, description="After this instant the request is answered with deadline_exceeded."
    )

    def expired(self, now: datetime | None = None) -> bool:
        return self.deadline is not None and (now or utcnow()) >= self.deadline

    def envelope(self, **overrides: object) -> dict[str, object]:
        """The envelope fields of this event, for building a follow-up event of the same request."""
        fields = {
            "request_id": self.request_id,
            "tenant_id": self.tenant_id,
            "user_id": self.user_id,
            "lane": self.lane,
            "deadline": self.deadline,
        }
        fields.update(overrides)
        return fields
