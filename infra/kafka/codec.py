"""Bytes ⇄ events. Decoding never raises anything but `DecodeError`, whose `error_class` says
why (for the DLQ), so a poll loop can route bad input away and keep going."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from infra.telemetry import inject_headers
from schemas.base import SCHEMA_VERSION, EventBase
from schemas.headers import EVENT_TYPE_HEADER, SCHEMA_VERSION_HEADER, UNREADABLE_HEADER

E = TypeVar("E", bound=EventBase)

Headers = list[tuple[str, bytes]]


class RecordLike(Protocol):
    """What the codec needs of a consumed record (aiokafka's ConsumerRecord has it)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Any


class DecodeError(ValueError):
    """Why bytes are not a valid event: `error_class` is one of
    unreadable, empty, too_large, invalid_utf8, not_json, wrong_event_type, unsupported_version,
    schema_validation; or tenant_mismatch (a valid event on another tenant's topic:
    `infra.kafka.dlq.tenant_mismatch`)."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class
        self.message = message


@dataclass(frozen=True)
class Encoded:
    key: bytes
    value: bytes
    headers: Headers


#: A record to publish: (topic, encoded event).
Output = tuple[str, Encoded]


def event_key(event: EventBase) -> str:
    """Partitioning key: documents by doc_id (ordered per document), everything else by request."""
    doc_id = getattr(event, "doc_id", None)
    return doc_id if isinstance(doc_id, str) else event.request_id


def encode(event: EventBase, *, key: str | None = None, headers: Headers | None = None) -> Encoded:
    """JSON value, UTF-8 key, and contract headers plus the current trace context."""
    out: Headers = [
        (EVENT_TYPE_HEADER, event.event_type.encode()),
        (SCHEMA_VERSION_HEADER, str(event.schema_version).encode()),
    ]
    if headers:
        out.extend(headers)
    inject_headers(out)
    return Encoded(
        key=(key if key is not None else event_key(event)).encode(),
        value=event.model_dump_json(exclude_none=False).encode(),
        headers=out,
    )


def header(headers: Any, name: str) -> bytes | None:
    for k, v in headers or ():
        if k == name:
            return v
    return None


def _summarize(err: ValidationError, limit: int = 3) -> str:
    parts = []
    for e in err.errors()[:limit]:
        where = ".".join(str(p) for p in e.get("loc", ())) or "(root)"
        parts.append(f"{where}: {e.get('msg')}")
    more = err.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def decode(value: bytes | None, model: type[E], *, max_bytes: int, headers: Any = None) -> E:
    """Parse and validate one event; raises only DecodeError."""
    unreadable = header(headers, UNREADABLE_HEADER)
    if unreadable is not None:
        raise DecodeError(
            "unreadable",
            f"the Kafka client could not read the record: {unreadable.decode('utf-8', 'replace')[:500]}",
        )
    if value is None or len(value) == 0:
        raise DecodeError("empty", "the record has no value")
    if len(value) > max_bytes:
        raise DecodeError("too_large", f"{len(value)} bytes is over the {max_bytes}-byte limit of this topic")
    declared = header(headers, EVENT_TYPE_HEADER)
    if declared is not None and declared != model.event_type.encode():
        shown = declared.decode(errors="replace")[:64]
        raise DecodeError(
            "wrong_event_type", f"header says {shown!r}, this topic carries {model.event_type!r}"
        )
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError("invalid_utf8", f"byte {e.start}: {e.reason}") from None
    try:
        event = model.model_validate_json(value)
    except ValidationError as e:
        if any(x.get("type") == "json_invalid" for x in e.errors()):
            raise DecodeError("not_json", _summarize(e, 1)) from None
        if any(x.get("type") == "model_type" and not x.get("loc") for x in e.errors()):
            raise DecodeError("not_json", "the value is JSON but not an object") from None
        raise DecodeError("schema_validation", _summarize(e)) from None
    except Exception as e:  # noqa: BLE001 - the contract: only DecodeError escapes
        raise DecodeError("schema_validation", f"{type(e).__name__}: {e}") from None
    if event.schema_version > SCHEMA_VERSION:
        raise DecodeError(
            "unsupported_version", f"schema_version {event.schema_version} is newer than {SCHEMA_VERSION}"
        )
    return event


def decode_record(record: RecordLike, model: type[E], *, max_bytes: int) -> E:
    return decode(record.value, model, max_bytes=max_bytes, headers=record.headers)


def salvage_envelope(value: bytes | None) -> dict[str, str]:
    """Best-effort envelope (request_id, tenant_id, user_id, lane, ...) of bytes that failed to
    decode, so the requester can still be told why. Empty when nothing usable is there. Values are
    whatever strings the bytes hold, of any length: callers cut them to `schemas.limits` (a dead
    letter) or check them against it (`infra.kafka.dlq.routable`)."""
    if not value or len(value) > 64 * 1024 * 1024:
        return {}
    try:
        obj = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(obj, dict):
        return {}
    out: dict[str, str] = {}
    for name in ("request_id", "tenant_id", "user_id", "job_id", "custom_id", "conversation_id"):
        v = obj.get(name)
        if isinstance(v, str) and v:
            out[name] = v
    if obj.get("lane") in ("chat", "bulk"):
        out["lane"] = obj["lane"]
    return out
