"""Dead letters: what a stage could not process goes to `<topic>.dlq` with the reason, and the
requester (when the bytes still name one) gets a ChatResponse carrying a clear error."""

from __future__ import annotations

import logging
from typing import Any

from infra.kafka.codec import DecodeError, Encoded, RecordLike, encode, salvage_envelope
from schemas import ChatResponse, DeadLetter, ErrorCode, ErrorInfo, KafkaHeader, Topics
from schemas.topics import dlq_name

log = logging.getLogger(__name__)


def dead_letter(record: RecordLike, error: BaseException, *, stage: str) -> DeadLetter:
    """A DeadLetter carrying the original record's bytes, coordinates and the reason."""
    if isinstance(error, DecodeError):
        error_class, message = error.error_class, error.message
    else:
        error_class, message = "processing", f"{type(error).__name__}: {error}"
    env = salvage_envelope(record.value)
    lane = env.get("lane")
    return DeadLetter(
        request_id=env.get("request_id") or f"{record.topic}/{record.partition}/{record.offset}",
        tenant_id=env.get("tenant_id", "unknown"),
        user_id=env.get("user_id", "anonymous"),
        lane=lane if lane in ("chat", "bulk") else "chat",  # type: ignore[arg-type]
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        source_timestamp_ms=record.timestamp if record.timestamp and record.timestamp > 0 else None,
        original_key=record.key,
        original_value=record.value,
        original_headers=[KafkaHeader(key=k, value=v) for k, v in (record.headers or ())],
        error_class=error_class,
        error_message=message[:4000],
        stage=stage,
    )


def encode_dead_letter(record: RecordLike, error: BaseException, *, stage: str) -> tuple[str, Encoded]:
    """(DLQ topic, encoded DeadLetter) for `record`, keyed like the original."""
    letter = dead_letter(record, error, stage=stage)
    key = record.key.decode("utf-8", "replace") if record.key else letter.request_id
    return dlq_name(record.topic), encode(letter, key=key)


def rejection_reason(error: BaseException) -> str:
    """`(<error class>): <message>`: why a requester's bytes were rejected, as they are told."""
    if isinstance(error, DecodeError):
        return f"({error.error_class}): {error.message}"
    return f"(processing): {error}"


def rejection_response(
    record: RecordLike, error: BaseException, *, topics: Topics, code: ErrorCode = ErrorCode.INVALID_REQUEST
) -> tuple[str, Encoded] | None:
    """An error ChatResponse for the requester of a rejected request, or None when the bytes
    name no request (no request_id and tenant_id to route the answer by)."""
    env = salvage_envelope(record.value)
    if "request_id" not in env or "tenant_id" not in env:
        return None
    lane: Any = env.get("lane", "bulk" if ".bulk." in record.topic else "chat")
    try:
        response = ChatResponse(
            request_id=env["request_id"],
            tenant_id=env["tenant_id"],
            user_id=env.get("user_id", "anonymous"),
            lane=lane,
            finish_reason="error",
            error=ErrorInfo(code=code, message=f"the request was rejected {rejection_reason(error)}"[:2000]),
            job_id=env.get("job_id"),
            custom_id=env.get("custom_id"),
            conversation_id=env.get("conversation_id"),
        )
    except ValueError:  # e.g. a tenant_id that breaks the contract's pattern
        log.debug("no rejection response for %s/%d/%d", record.topic, record.partition, record.offset)
        return None
    return topics.responses(lane), encode(response)
