"""Kafka record → `audit_log` row.

The payload is stored as it came (the event's JSON, untouched unless fields are encrypted); the
columns beside it are lifted out of it for querying: who (tenant, user, ip), what (action,
event type), which request (request_id, event_id, trace_id) and what it cost (token usage).

Events are parsed, not validated against their schema: the sink records what travelled, and
the components that own a topic route invalid events to the DLQ (which is recorded too, as
ERROR). Bytes that are not a JSON object still get a row: their raw bytes (base64) in the
payload and the reason in `error`.

`created_at` (which also picks the row's monthly partition) is never a time the producer chose:
it is the broker's append time when the record carries one (ragbus topics are declared with
`message.timestamp.type=LogAppendTime`), else the time the sink received the record. A producer's
own timestamp is kept as data only, in `producer_time`.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from infra.kafka.codec import RecordLike, header
from schemas.headers import EVENT_TYPE_HEADER, TRACEPARENT_HEADER
from schemas.topics import DLQ_SUFFIX, spec_for_topic, tenant_of
from sinks.audit.crypto import Keyring, seal

#: Column order of a row (the staging table and COPY use it).
COLUMNS: tuple[str, ...] = (
    "created_at",
    "topic",
    "partition",
    "offset",
    "action_type",
    "event_type",
    "event_id",
    "request_id",
    "tenant_id",
    "user_id",
    "lane",
    "trace_id",
    "ip_address",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "key_id",
    "error",
    "request_payload",
    "producer_time",
    "time_source",
)
Row = tuple[Any, ...]
COL = {name: i for i, name in enumerate(COLUMNS)}

#: The CHECK list of audit_log.action_type.
ACTIONS = (
    "QUERY",
    "RETRIEVAL",
    "RESPONSE",
    "TOKEN",
    "INGEST",
    "MODEL_UPDATE",
    "CONFIG_CHANGE",
    "ERROR",
    "OTHER",
)

ACTION_BY_EVENT_TYPE = {
    "chat.request": "QUERY",
    "chat.enriched": "RETRIEVAL",
    "chat.response": "RESPONSE",
    "chat.token": "TOKEN",
    "chat.cancel": "QUERY",
    "docs.ingest": "INGEST",
    "docs.ingested": "INGEST",
    "dead_letter": "ERROR",
    "model.update": "MODEL_UPDATE",
    "config.change": "CONFIG_CHANGE",
}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the end of Python's datetime
#: Longer ids are cut: they are indexed, and a btree entry must stay under ~2.7 kB.
MAX_ID_CHARS = 512
_INT4 = 2**31


#: aiokafka's `ConsumerRecord.timestamp_type`: 0 is CreateTime (set by the producer, anything it
#: likes), 1 is LogAppendTime (set by the broker when it appended the record).
CREATE_TIME, LOG_APPEND_TIME = 0, 1
#: A broker time this far from the sink's clock is not believed either (a broker with a broken
#: clock, or a replay of records older than any retention ragbus declares): the row takes the
#: receive time, so no row lands in, or creates, an absurd month.
TRUSTED_PAST = timedelta(days=365)
TRUSTED_FUTURE = timedelta(days=1)
#: `time_source` values: where the row's created_at came from.
FROM_BROKER, FROM_RECEIPT = "broker", "received"


def record_time(timestamp_ms: int | None) -> datetime | None:
    """A Kafka timestamp as a datetime; None when the record has none (-1) or it is beyond what a
    datetime holds."""
    if not isinstance(timestamp_ms, int) or not 0 <= timestamp_ms <= _MAX_TS_MS:
        return None
    return _EPOCH + timedelta(milliseconds=timestamp_ms)


def choose_time(
    timestamp_ms: int | None, timestamp_type: int | None, received: datetime
) -> tuple[datetime, str]:
    """(created_at, time_source) of a record the sink received at `received`.

    The record's timestamp counts only when the broker set it (LogAppendTime) and it lies within
    [received - TRUSTED_PAST, received + TRUSTED_FUTURE]; a broker time is the same on every read,
    so a replayed record gets the same created_at, and `ON CONFLICT DO NOTHING` drops it. Anything
    else (a producer's CreateTime, from a topic not yet declared with LogAppendTime or records
    written before it was) gets `received`: replays of those rows are dropped by the
    `audit_log_skip_replayed` trigger, which looks the record's coordinates up instead."""
    if timestamp_type == LOG_APPEND_TIME:
        appended = record_time(timestamp_ms)
        if appended is not None and received - TRUSTED_PAST <= appended <= received + TRUSTED_FUTURE:
            return appended, FROM_BROKER
    return received, FROM_RECEIPT


def producer_time(timestamp_ms: int | None, timestamp_type: int | None) -> datetime | None:
    """What the producer claimed (CreateTime), kept as data; None for a broker-stamped record
    (the broker overwrote the claim) or a record without a representable timestamp."""
    return record_time(timestamp_ms) if timestamp_type != LOG_APPEND_TIME else None


def _times(record: RecordLike, received: datetime) -> tuple[datetime, datetime | None, str]:
    """(created_at, producer_time, time_source) of `record`. Records without a timestamp type (not
    from aiokafka) count as CreateTime: nothing vouches for their timestamp."""
    kind = getattr(record, "timestamp_type", CREATE_TIME)
    created, source = choose_time(record.timestamp, kind, received)
    return created, producer_time(record.timestamp, kind), source


def trace_id_of(traceparent: bytes | None) -> str | None:
    """The trace id of a W3C `traceparent` header (`00-<trace id>-<span id>-<flags>`)."""
    if not traceparent:
        return None
    parts = traceparent.split(b"-")
    if len(parts) < 4 or len(parts[1]) != 32:
        return None
    trace = parts[1].decode("ascii", "replace").lower()
    if trace == "0" * 32 or any(c not in "0123456789abcdef" for c in trace):
        return None
    return trace


def _text(value: Any) -> str | None:
    return value[:MAX_ID_CHARS] if isinstance(value, str) else None


def _count(value: Any) -> int | None:
    return value if type(value) is int and 0 <= value < _INT4 else None


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def _parse_ip(value: str) -> IP | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _ip(value: Any) -> IP | None:
    """A valid address or None (parsing is cached: client addresses repeat)."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    return _parse_ip(value)


def _without_nul(node: Any) -> Any:
    """Postgres text and jsonb cannot hold U+0000: it becomes U+FFFD."""
    if isinstance(node, str):
        return node.replace("\x00", "\ufffd")
    if isinstance(node, dict):
        return {_without_nul(k): _without_nul(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_without_nul(v) for v in node]
    return node


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode("ascii") if data is not None else None


class RowMapper:
    """Maps records of the topics under `prefix` to rows, sealing sensitive fields when a
    keyring is given."""

    def __init__(self, prefix: str, keyring: Keyring | None = None) -> None:
        self.prefix = prefix
        self.keyring = keyring
        self._declared: dict[str, str | None] = {}

    def event_type(self, topic: str, headers: Any) -> str | None:
        """The declared event type of the topic; else the record's event-type header."""
        if topic not in self._declared:
            spec = spec_for_topic(topic, self.prefix)
            self._declared[topic] = spec.event.event_type if spec is not None else None
        declared = self._declared[topic]
        if declared is not None:
            return declared
        named = header(headers, EVENT_TYPE_HEADER)
        if named:
            return named.decode("utf-8", "replace").replace("\x00", "\ufffd")[:128]
        return "dead_letter" if topic.endswith(DLQ_SUFFIX) else None

    def rows(self, records: list[Any], received: datetime | None = None) -> list[Row]:
        """Rows of `records`, which the sink received at `received` (default: now)."""
        received = received or datetime.now(UTC)
        out = []
        for r in records:
            try:
                out.append(self.row(r, received))
            except Exception as e:  # noqa: BLE001 - no record may stop the partition: keep its bytes
                out.append(self._raw(r, None, f"unmappable: {type(e).__name__}: {e}", received))
        return out

    def row(self, record: RecordLike, received: datetime | None = None) -> Row:
        received = received or datetime.now(UTC)
        value = record.value
        event_type = self.event_type(record.topic, record.headers)
        if not value:
            return self._raw(record, event_type, "empty: the record has no value", received)
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError as e:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as u:
                return self._raw(record, event_type, f"invalid_utf8: byte {u.start}: {u.reason}", received)
            return self._raw(record, event_type, f"not_json: {e}", received)
        if not isinstance(obj, dict):
            return self._raw(record, event_type, "not_json: the value is JSON but not an object", received)

        error = None
        payload: str | None = None
        if b"\\u0000" in value:
            clean = _without_nul(obj)
            if clean != obj:
                obj, payload = clean, orjson.dumps(clean).decode()
                error = "nul_replaced: U+0000 in the event was stored as U+FFFD"
        action = ACTION_BY_EVENT_TYPE.get(event_type or "", "OTHER")
        if (event_type == "chat.response" and obj.get("error")) or (
            event_type == "docs.ingested" and obj.get("status") == "error"
        ):
            action = "ERROR"
        request = obj.get("request")
        inner = request if isinstance(request, dict) else {}
        usage = obj.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        ip = _ip(obj.get("client_ip")) or _ip(inner.get("client_ip"))
        key_id = None
        if self.keyring is not None and event_type and seal(obj, event_type, self.keyring, _where(record)):
            payload, key_id = orjson.dumps(obj).decode(), self.keyring.primary
        created, claimed, source = _times(record, received)
        return (
            created,
            record.topic,
            record.partition,
            record.offset,
            action,
            event_type,
            _text(obj.get("event_id")),
            _text(obj.get("request_id")),
            # A tenant topic's records come from (or go to) its tenant, whatever the payload says;
            # internal topics are written only by ragbus's components.
            tenant_of(record.topic, self.prefix) or _text(obj.get("tenant_id")),
            _text(obj.get("user_id")),
            _text(obj.get("lane")),
            trace_id_of(header(record.headers, TRACEPARENT_HEADER)),
            ip,
            _text(obj.get("model")) or _text(inner.get("model")),
            _count(usage.get("prompt_tokens")),
            _count(usage.get("completion_tokens")),
            key_id,
            error,
            payload if payload is not None else value.decode("utf-8"),
            claimed,
            source,
        )

    def _raw(self, record: RecordLike, event_type: str | None, error: str, received: datetime) -> Row:
        """A row for bytes that are not an event: the bytes themselves, base64, and why."""
        raw: dict[str, Any] = {
            "raw_b64": _b64(record.value),
            "key_b64": _b64(record.key),
            "headers": [[k, _b64(v)] for k, v in record.headers or ()],
        }
        key_id = None
        if self.keyring is not None and seal(raw, "raw", self.keyring, _where(record)):
            key_id = self.keyring.primary
        created, claimed, source = _times(record, received)
        return (
            created,
            record.topic,
            record.partition,
            record.offset,
            "ERROR",
            event_type,
            None,
            None,
            tenant_of(record.topic, self.prefix),
            None,
            None,
            trace_id_of(header(record.headers, TRACEPARENT_HEADER)),
            None,
            None,
            None,
            None,
            key_id,
            error[:2000],
            orjson.dumps(_without_nul(raw)).decode(),
            claimed,
            source,
        )


def _where(record: RecordLike) -> str:
    return f"{record.topic}/{record.partition}/{record.offset}"


def unstorable(row: Row, reason: str) -> Row:
    """The stand-in for a row Postgres refused: coordinates and times kept (time_source decides
    how a replay of the record is recognised), everything else (already sealed where needed)
    moved into the payload as base64 of its JSON."""
    kept = ("created_at", "topic", "partition", "offset", "event_type", "key_id")
    kept += ("producer_time", "time_source")
    original = {
        name: row[i] for i, name in enumerate(COLUMNS) if name not in ("created_at", "request_payload")
    }
    original["ip_address"] = str(original["ip_address"]) if original["ip_address"] is not None else None
    blob = orjson.dumps({"columns": original, "payload": row[COL["request_payload"]]}, default=str)
    out = [None] * len(COLUMNS)
    for name in kept:
        out[COL[name]] = row[COL[name]]
    out[COL["action_type"]] = "ERROR"
    out[COL["error"]] = f"unstorable: Postgres refused the row: {reason}"[:2000].replace("\x00", "\ufffd")
    out[COL["request_payload"]] = orjson.dumps({"unstorable_b64": _b64(blob)}).decode()
    if out[COL["event_type"]] is not None:
        out[COL["event_type"]] = out[COL["event_type"]].replace("\x00", "\ufffd")
    return tuple(out)
