"""Record → audit row mapping: actions, lifted columns, undecodable bytes, the row's time (never
the producer's), determinism."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from infra.kafka.codec import encode
from infra.postgres.migrations import MIGRATIONS_DIR
from infra.smoke import sample_event
from schemas import (
    ChatRequest,
    ChatResponse,
    EnrichedRequest,
    ErrorCode,
    ErrorInfo,
    IngestResult,
    Usage,
)
from schemas.topics import TOPICS, spec
from sinks.audit.rows import (
    ACTIONS,
    COL,
    COLUMNS,
    CREATE_TIME,
    FROM_BROKER,
    FROM_RECEIPT,
    LOG_APPEND_TIME,
    RowMapper,
    choose_time,
    producer_time,
    record_time,
    trace_id_of,
    unstorable,
)
from sinks.audit.writer import CREATE_STAGE, refused

PREFIX = "ragbus"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@dataclass
class Rec:
    topic: str
    value: bytes | None
    partition: int = 0
    offset: int = 7
    timestamp: int = 1_764_180_000_123
    #: aiokafka's ConsumerRecord.timestamp_type: CreateTime unless a test says the broker stamped it.
    timestamp_type: int = CREATE_TIME
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def rec(topic: str, event: Any, **kw: Any) -> Rec:
    """`event` on the topic of suffix `topic` (a tenant topic: its event's tenant's)."""
    enc = encode(event)
    name = spec(topic).name(PREFIX, event.tenant_id if spec(topic).per_tenant else None)
    return Rec(name, enc.value, key=enc.key, headers=enc.headers, **kw)


def col(row: tuple[Any, ...], name: str) -> Any:
    return row[COL[name]]


EXPECTED_ACTION = {
    "chat.request": "QUERY",
    "chat.enriched": "RETRIEVAL",
    "chat.response": "RESPONSE",
    "chat.token": "TOKEN",
    "chat.cancel": "QUERY",
    "docs.ingest": "INGEST",
    "docs.ingested": "INGEST",
    "dead_letter": "ERROR",
}


@pytest.mark.parametrize("spec", TOPICS, ids=lambda s: s.suffix)
def test_every_declared_topic_maps_to_its_action(spec: Any) -> None:
    event = sample_event(spec.event, "r-1")
    row = RowMapper(PREFIX).row(rec(spec.suffix, event))
    assert col(row, "action_type") == EXPECTED_ACTION[spec.event.event_type]
    assert col(row, "event_type") == spec.event.event_type
    assert col(row, "request_id") == "r-1"
    assert col(row, "tenant_id") == "smoke" and col(row, "user_id") == "ragbus-smoke"
    assert col(row, "event_id") == event.event_id
    assert col(row, "error") is None and col(row, "key_id") is None
    # The payload is the event's JSON exactly as it travelled.
    assert orjson.loads(col(row, "request_payload")) == orjson.loads(encode(event).value)


def test_errors_are_error_rows() -> None:
    mapper = RowMapper(PREFIX)
    failed = ChatResponse(
        tenant_id="acme", finish_reason="error", error=ErrorInfo(code=ErrorCode.ENGINE_ERROR, message="x")
    )
    assert col(mapper.row(rec("chat.responses", failed)), "action_type") == "ERROR"
    bad_doc = IngestResult(tenant_id="acme", doc_id="d", op="upsert", status="error")
    assert col(mapper.row(rec("docs.ingested", bad_doc)), "action_type") == "ERROR"


def test_usage_model_ip_and_trace_are_lifted() -> None:
    mapper = RowMapper(PREFIX)
    resp = ChatResponse(tenant_id="acme", model="smol", usage=Usage(prompt_tokens=120, completion_tokens=30))
    row = mapper.row(rec("chat.responses", resp))
    assert (col(row, "prompt_tokens"), col(row, "completion_tokens"), col(row, "model")) == (120, 30, "smol")

    req = ChatRequest(question="q", tenant_id="acme", client_ip="192.0.2.7", model="smol")
    headers = [("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01".encode())]
    enc = encode(req)
    row = mapper.row(Rec(f"{PREFIX}.t.acme.chat.requests", enc.value, headers=headers))
    assert str(col(row, "ip_address")) == "192.0.2.7" and col(row, "trace_id") == TRACE
    enriched = EnrichedRequest(request=req, **req.envelope())
    row = mapper.row(rec("chat.enriched", enriched))
    assert str(col(row, "ip_address")) == "192.0.2.7" and col(row, "model") == "smol"


def test_the_codec_header_carries_a_trace_id_when_a_span_is_current() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("produce") as span:
        enc = encode(ChatRequest(question="q", tenant_id="acme"))
    row = RowMapper(PREFIX).row(Rec(f"{PREFIX}.t.acme.chat.requests", enc.value, headers=enc.headers))
    assert col(row, "trace_id") == f"{span.get_span_context().trace_id:032x}"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe{", "invalid_utf8"),
        (b"this is not json {", "not_json"),
        (b"[1, 2, 3]", "not_json"),
        (b"", "empty"),
        (None, "empty"),
        (b'{"question": "\\ud800"}', "not_json"),  # a lone surrogate: jsonb refuses it
        (b'{"x": NaN}', "not_json"),
    ],
)
def test_undecodable_bytes_still_get_a_row(value: bytes | None, reason: str) -> None:
    r = Rec(f"{PREFIX}.t.acme.chat.requests", value, key=b"k1", headers=[("h", b"\x00\x01")])
    row = RowMapper(PREFIX).row(r)
    assert col(row, "action_type") == "ERROR" and col(row, "error").startswith(reason)
    assert col(row, "event_type") == "chat.request"
    payload = orjson.loads(col(row, "request_payload"))
    assert (base64.b64decode(payload["raw_b64"]) if payload["raw_b64"] else value or None) == (value or None)
    assert base64.b64decode(payload["key_b64"]) == b"k1"
    assert payload["headers"] == [["h", base64.b64encode(b"\x00\x01").decode()]]


def test_a_tenant_topic_row_names_the_topic_tenant_not_the_payload_one() -> None:
    forged = encode(ChatRequest(question="q", tenant_id="victim"))
    row = RowMapper(PREFIX).row(Rec(f"{PREFIX}.t.acme.chat.requests", forged.value, headers=forged.headers))
    assert col(row, "tenant_id") == "acme"
    raw = RowMapper(PREFIX).row(Rec(f"{PREFIX}.t.acme.chat.requests", b"not json"))
    assert col(raw, "tenant_id") == "acme" and col(raw, "action_type") == "ERROR"


def test_nul_characters_are_replaced_not_lost() -> None:
    value = b'{"tenant_id": "a\\u0000b", "request_id": "r", "question": "x\\u0000y"}'
    row = RowMapper(PREFIX).row(Rec(f"{PREFIX}.chat.enriched", value))  # internal: the payload's tenant
    assert col(row, "tenant_id") == "a\ufffdb" and col(row, "error").startswith("nul_replaced")
    assert "\\u0000" not in col(row, "request_payload")
    assert orjson.loads(col(row, "request_payload"))["question"] == "x\ufffdy"


def test_topics_outside_the_contract_use_the_event_type_header() -> None:
    mapper = RowMapper(PREFIX)
    named = Rec(
        f"{PREFIX}.models.updates", b'{"model": "m2"}', headers=[("ragbus-event-type", b"model.update")]
    )
    assert col(mapper.row(named), "action_type") == "MODEL_UPDATE"
    assert col(mapper.row(Rec(f"{PREFIX}.something.new", b"{}")), "action_type") == "OTHER"
    assert col(mapper.row(Rec(f"{PREFIX}.something.new.dlq", b"{}")), "action_type") == "ERROR"


NOW = datetime(2026, 12, 4, 15, 0, tzinfo=UTC)
YEAR_2999_MS = 32_503_593_600_000  # 2999-12-31T00:00Z


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def test_record_time_is_none_without_a_representable_timestamp() -> None:
    assert record_time(1_764_180_000_123) == datetime(2025, 11, 26, 18, 0, 0, 123000, tzinfo=UTC)
    assert record_time(0) == datetime(1970, 1, 1, tzinfo=UTC)
    assert record_time(None) is record_time(-1) is record_time(2**62) is None


def test_only_a_plausible_broker_time_becomes_created_at() -> None:
    hour_ago = NOW - timedelta(hours=1)
    assert choose_time(_ms(hour_ago), LOG_APPEND_TIME, NOW) == (hour_ago, FROM_BROKER)
    # The window's edges: a year back and a day ahead are believed, a millisecond beyond is not.
    for edge in (NOW - timedelta(days=365), NOW + timedelta(days=1)):
        assert choose_time(_ms(edge), LOG_APPEND_TIME, NOW) == (edge, FROM_BROKER)
    for beyond in (NOW - timedelta(days=365, milliseconds=1), NOW + timedelta(days=1, milliseconds=1)):
        assert choose_time(_ms(beyond), LOG_APPEND_TIME, NOW) == (NOW, FROM_RECEIPT)
    # A broker time from 1970 or 2999 (a broken broker clock) does not make an absurd month either.
    for absurd in (0, YEAR_2999_MS, -1, 2**62, None):
        assert choose_time(absurd, LOG_APPEND_TIME, NOW) == (NOW, FROM_RECEIPT)


def test_a_producer_time_is_never_created_at_but_is_kept_as_data() -> None:
    for claimed in (0, YEAR_2999_MS, _ms(NOW - timedelta(minutes=5)), _ms(NOW), -1, 2**62, None):
        assert choose_time(claimed, CREATE_TIME, NOW) == (NOW, FROM_RECEIPT)
        assert choose_time(claimed, None, NOW) == (NOW, FROM_RECEIPT)
    assert producer_time(0, CREATE_TIME) == datetime(1970, 1, 1, tzinfo=UTC)
    assert producer_time(YEAR_2999_MS, CREATE_TIME) == datetime(2999, 12, 31, tzinfo=UTC)
    assert producer_time(-1, CREATE_TIME) is None and producer_time(2**62, CREATE_TIME) is None
    # A broker-stamped record no longer carries the producer's claim.
    assert producer_time(_ms(NOW), LOG_APPEND_TIME) is None


def test_rows_take_their_time_from_the_broker_or_the_receipt() -> None:
    mapper = RowMapper(PREFIX)
    event = ChatRequest(question="q", tenant_id="acme")
    later = NOW + timedelta(seconds=30)
    stamped = rec("chat.requests", event, timestamp=_ms(NOW), timestamp_type=LOG_APPEND_TIME)
    # A broker time is a pure function of the record: a replay read later maps to the same row.
    assert mapper.row(stamped, NOW) == mapper.row(stamped, later)
    row = mapper.row(stamped, later)
    assert (col(row, "created_at"), col(row, "producer_time"), col(row, "time_source")) == (
        NOW,
        None,
        FROM_BROKER,
    )
    for value in (encode(event).value, b"not json {"):  # events and undecodable bytes alike
        for claimed in (0, YEAR_2999_MS):
            r = Rec(f"{PREFIX}.t.acme.chat.requests", value, timestamp=claimed, timestamp_type=CREATE_TIME)
            (row,) = mapper.rows([r], later)
            assert col(row, "created_at") == later and col(row, "time_source") == FROM_RECEIPT
            assert col(row, "producer_time") == record_time(claimed)
    # Without an explicit receive time, the mapping time is used.
    before = datetime.now(UTC)
    row = mapper.row(Rec(f"{PREFIX}.t.acme.chat.requests", encode(event).value, timestamp=0))
    assert before <= col(row, "created_at") <= datetime.now(UTC)


def test_the_time_sources_match_the_migration_check() -> None:
    sql = (MIGRATIONS_DIR / "0006_audit_time.sql").read_text()
    check = re.search(r"time_source IN \((.*?)\)", sql)
    assert check is not None
    assert re.findall(r"'(\w+)'", check.group(1)) == [FROM_BROKER, FROM_RECEIPT]


def test_trace_ids() -> None:
    assert trace_id_of(f"00-{TRACE}-00f067aa0ba902b7-01".encode()) == TRACE
    assert trace_id_of(b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01") is None
    assert trace_id_of(b"garbage") is None and trace_id_of(None) is None


def test_long_ids_are_cut_to_fit_an_index() -> None:
    value = orjson.dumps({"user_id": "u" * 10_000, "tenant_id": "t"})
    assert len(col(RowMapper(PREFIX).row(Rec(f"{PREFIX}.x", value)), "user_id")) == 512


def test_action_list_matches_the_migration_check() -> None:
    sql = (MIGRATIONS_DIR / "0005_audit_log.sql").read_text()
    check = re.search(r"action_type IN \((.*?)\)\)", sql, re.S)
    assert check is not None
    assert tuple(re.findall(r"'([A-Z_]+)'", check.group(1))) == ACTIONS


def test_staging_table_has_the_row_columns_in_order() -> None:
    assert re.findall(r'"(\w+)" \w+', CREATE_STAGE) == list(COLUMNS)


def test_unstorable_keeps_the_coordinates_and_the_content() -> None:
    row = RowMapper(PREFIX).row(rec("chat.requests", ChatRequest(question="q", tenant_id="acme")), NOW)
    stand_in = unstorable(row, "invalid input syntax")
    for name in ("created_at", "topic", "partition", "offset", "producer_time", "time_source"):
        assert col(stand_in, name) == col(row, name)
    assert col(stand_in, "action_type") == "ERROR" and "invalid input syntax" in col(stand_in, "error")
    blob = orjson.loads(base64.b64decode(orjson.loads(col(stand_in, "request_payload"))["unstorable_b64"]))
    assert blob["payload"] == col(row, "request_payload") and blob["columns"]["tenant_id"] == "acme"


def test_refused_means_the_data_not_the_connection() -> None:
    import asyncpg

    assert refused(asyncpg.exceptions.UntranslatableCharacterError("x"))
    assert refused(asyncpg.exceptions.ProgramLimitExceededError("x"))
    assert refused(ValueError("cannot encode"))
    assert not refused(asyncpg.exceptions.AdminShutdownError("x"))
    assert not refused(ConnectionRefusedError())
    assert not refused(asyncpg.exceptions.UndefinedTableError("x"))


def test_a_record_that_breaks_the_mapping_still_gets_a_row() -> None:
    class Broken(RowMapper):
        def row(self, record: Any, received: datetime | None = None) -> tuple[Any, ...]:
            raise RuntimeError("a bug in the mapping")

    (row,) = Broken(PREFIX).rows([Rec(f"{PREFIX}.t.acme.chat.requests", b'{"tenant_id": "acme"}')])
    assert col(row, "action_type") == "ERROR" and "unmappable: RuntimeError" in col(row, "error")
    assert col(row, "offset") == 7
    assert base64.b64decode(orjson.loads(col(row, "request_payload"))["raw_b64"]) == b'{"tenant_id": "acme"}'
