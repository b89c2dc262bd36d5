"""Dead letters: what a stage could not process goes to `<topic>.dlq` with the reason, and the
requester (when the bytes still name one) gets a reply carrying a clear error.

The dead-letter path is the last line of defence, so it must never fail itself: whatever the
record holds (ids of any length, a value larger than the DLQ accepts, thousands of headers), the
echoed parts are cut to the limits in `schemas.limits` and the DeadLetter says so. Should
building it still fail, a minimal dead letter with the record's coordinates is used instead.
A failure here would otherwise raise inside a poll loop and stop a partition for every tenant.
"""

from __future__ import annotations

import logging
from typing import Any

from infra.kafka.codec import DecodeError, Encoded, RecordLike, encode, salvage_envelope
from schemas import ChatResponse, DeadLetter, ErrorCode, ErrorInfo, KafkaHeader, Topics, limits
from schemas.topics import dlq_name, max_message_bytes

log = logging.getLogger(__name__)

#: Per-event failures that are not decode errors carry this class unless the exception names its
#: own (an `error_class` attribute, e.g. `parse_timeout`).
PROCESSING = "processing"


def error_class(error: BaseException) -> str:
    """The dead letter's `error_class` for `error`: a decode class, the exception's own
    `error_class`, or `processing`."""
    named = getattr(error, "error_class", None)
    return limits.cut(named, limits.ERROR_CLASS_MAX) if isinstance(named, str) and named else PROCESSING


def error_message(error: BaseException) -> str:
    """What went wrong, in one line: the decode message, or `<ExceptionClass>: <text>`."""
    text = error.message if isinstance(error, DecodeError) else f"{type(error).__name__}: {error}"
    return limits.cut(text, limits.ERROR_MESSAGE_MAX)


def dead_letter(record: RecordLike, error: BaseException, *, stage: str) -> DeadLetter:
    """A DeadLetter carrying the original record's bytes (cut to what the DLQ holds), its
    coordinates and the reason. Never raises for any record."""
    try:
        return _full_dead_letter(record, error, stage=stage)
    except Exception:
        log.exception("dead letter for %s/%s@%s fell back to coordinates only", *_coords(record))
        return _minimal_dead_letter(record, error, stage=stage)


def _full_dead_letter(record: RecordLike, error: BaseException, *, stage: str) -> DeadLetter:
    env = salvage_envelope(record.value)
    value, value_cut = _bounded(record.value, _value_cap(record.topic))
    key, key_cut = _bounded(record.key, limits.DEAD_LETTER_KEY_MAX)
    headers, headers_cut = _headers(record.headers)
    lane = env.get("lane")
    return DeadLetter(
        request_id=limits.cut(env.get("request_id") or _coord_id(record), limits.REQUEST_ID_MAX),
        tenant_id=limits.cut(env.get("tenant_id") or "unknown", limits.TENANT_ID_MAX),
        user_id=limits.cut(env.get("user_id") or "anonymous", limits.USER_ID_MAX),
        lane=lane if lane in ("chat", "bulk") else "chat",  # type: ignore[arg-type]
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        source_timestamp_ms=_timestamp(record),
        original_key=key,
        original_value=value,
        original_size=len(record.value) if record.value is not None else None,
        original_truncated=value_cut or key_cut or headers_cut,
        original_headers=headers,
        error_class=error_class(error),
        error_message=error_message(error),
        stage=limits.cut(stage, limits.ERROR_MESSAGE_MAX),
    )


def _minimal_dead_letter(record: RecordLike, error: BaseException, *, stage: str) -> DeadLetter:
    topic, partition, offset = _coords(record)
    return DeadLetter(
        request_id=limits.cut(f"{topic}/{partition}/{offset}", limits.REQUEST_ID_MAX),
        source_topic=str(topic),
        source_partition=partition if isinstance(partition, int) and partition >= 0 else 0,
        source_offset=offset if isinstance(offset, int) and offset >= 0 else 0,
        original_truncated=True,
        error_class=error_class(error),
        error_message=limits.cut(f"{type(error).__name__} (the record could not be echoed)", 200),
        stage=limits.cut(str(stage), limits.ERROR_MESSAGE_MAX),
    )


def _coords(record: RecordLike) -> tuple[Any, Any, Any]:
    return (getattr(record, "topic", "?"), getattr(record, "partition", -1), getattr(record, "offset", -1))


def _coord_id(record: RecordLike) -> str:
    return "{}/{}/{}".format(*_coords(record))


def _timestamp(record: RecordLike) -> int | None:
    ts = record.timestamp
    return ts if isinstance(ts, int) and ts > 0 else None


def _value_cap(topic: str) -> int:
    """The source topic's max.message.bytes (its DLQ is sized for that much, base64 included)."""
    return max_message_bytes(topic, topic.split(".", 1)[0])


def _bounded(data: bytes | None, cap: int) -> tuple[bytes | None, bool]:
    if data is None or len(data) <= cap:
        return data, False
    return data[:cap], True


def _headers(headers: Any) -> tuple[list[KafkaHeader], bool]:
    out: list[KafkaHeader] = []
    cut = False
    for i, item in enumerate(headers or ()):
        if i >= limits.DEAD_LETTER_HEADERS_MAX:
            return out, True
        k, v = item
        key = k if isinstance(k, str) else bytes(k).decode("utf-8", "replace")
        value, value_cut = _bounded(v, limits.DEAD_LETTER_HEADER_VALUE_MAX)
        cut = cut or value_cut or len(key) > limits.METADATA_KEY_MAX
        out.append(KafkaHeader(key=limits.cut(key, limits.METADATA_KEY_MAX), value=value))
    return out, cut


def encode_dead_letter(record: RecordLike, error: BaseException, *, stage: str) -> tuple[str, Encoded]:
    """(DLQ topic, encoded DeadLetter) for `record`, keyed by its request id (or coordinates)."""
    letter = dead_letter(record, error, stage=stage)
    return dlq_name(record.topic), encode(letter, key=letter.request_id)


def rejection_reason(error: BaseException) -> str:
    """`(<error class>): <message>`: why a requester's bytes were rejected, as they are told."""
    return f"({error_class(error)}): {error.message if isinstance(error, DecodeError) else error}"


def routable(env: dict[str, str]) -> bool:
    """Whether a salvaged envelope names a requester a reply can reach: a request id and tenant
    id within the contract's limits (a reply to a cut id would reach nobody)."""
    request_id, tenant_id = env.get("request_id"), env.get("tenant_id")
    return (
        request_id is not None
        and tenant_id is not None
        and len(request_id) <= limits.REQUEST_ID_MAX
        and len(tenant_id) <= limits.TENANT_ID_MAX
    )


def rejection_response(
    record: RecordLike, error: BaseException, *, topics: Topics, code: ErrorCode = ErrorCode.INVALID_REQUEST
) -> tuple[str, Encoded] | None:
    """An error ChatResponse for the requester of a rejected request, or None when the bytes
    name no request (no request_id and tenant_id within the contract to route the answer by).
    Never raises."""
    try:
        env = salvage_envelope(record.value)
        if not routable(env):
            return None
        lane: Any = env.get("lane", "bulk" if ".bulk." in record.topic else "chat")
        response = ChatResponse(
            request_id=env["request_id"],
            tenant_id=env["tenant_id"],
            user_id=limits.cut(env.get("user_id", "anonymous"), limits.USER_ID_MAX),
            lane=lane,
            finish_reason="error",
            error=ErrorInfo(
                code=code,
                message=limits.cut(f"the request was rejected {rejection_reason(error)}", 2000),
            ),
            job_id=_optional_cut(env.get("job_id"), limits.JOB_ID_MAX),
            custom_id=_optional_cut(env.get("custom_id"), limits.CUSTOM_ID_MAX),
            conversation_id=_optional_cut(env.get("conversation_id"), limits.CONVERSATION_ID_MAX),
        )
        return topics.responses(lane), encode(response)
    except Exception:  # noqa: BLE001 - e.g. a tenant_id that breaks the contract's pattern: no reply
        log.debug("no rejection response for %s/%s@%s", *_coords(record))
        return None


def _optional_cut(value: str | None, limit: int) -> str | None:
    return limits.cut(value, limit) if value is not None else None
