"""The audit log's time is not the producer's to choose, against the real broker and Postgres.

A producer may stamp a record 1970 or 2999 (`send(..., timestamp_ms=...)`). On a ragbus topic the
broker replaces that with its own clock (declared `message.timestamp.type=LogAppendTime`, and
`declare_topics` brings older topics to it); on a topic that still keeps the producer's time the
sink uses its receive time. Either way the row sits at "now": `ragbus audit --since 5m` finds it,
no partition appears for an absurd month, and a replay stores nothing twice."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from infra.kafka.clients import make_admin, make_consumer, make_producer
from infra.kafka.codec import encode
from infra.kafka.topics import declare_topics
from infra.settings import Settings
from schemas import ChatRequest
from schemas.topics import TOPICS, spec
from sinks.audit.query import AuditFilter, fetch_entries, parse_when
from sinks.audit.rows import CREATE_TIME, FROM_BROKER, FROM_RECEIPT, LOG_APPEND_TIME, RowMapper
from sinks.audit.sink import AuditSink
from sinks.audit.writer import AuditWriter
from tests.helpers import wait_for
from tests.integration.audit_support import row_count
from tests.unit.test_audit_rows import Rec

EPOCH_MS = 0
YEAR_2999_MS = 32_503_593_600_000  # 2999-12-31T00:00Z
#: Kafka's Long.MAX_VALUE: lets a topic accept any producer time, as brokers before 4.0 did.
ANY_TIME = str(2**63 - 1)


async def _topic_configs(settings: Settings, topic: str) -> dict[str, str]:
    admin = make_admin(settings)
    await admin.start()
    try:
        (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        return {entry[0]: entry[1] for entry in response.resources[0][4]}
    finally:
        await admin.close()


async def _create(settings: Settings, topic: str, configs: dict[str, str]) -> None:
    admin = make_admin(settings)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs=configs)])
    finally:
        await admin.close()


async def _send_at(settings: Settings, topic: str, items: list[tuple[bytes, int]]) -> None:
    """Send each value with the producer time given, waiting for each to be acknowledged."""
    producer = make_producer(settings)
    await producer.start()
    try:
        for value, timestamp_ms in items:
            await producer.send_and_wait(topic, value, timestamp_ms=timestamp_ms, partition=0)
    finally:
        await producer.stop()


async def _first_records(settings: Settings, topic: str, n: int) -> list[Any]:
    consumer = make_consumer(settings, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.subscribe([topic])
        got: list[Any] = []
        deadline = asyncio.get_running_loop().time() + 30
        while len(got) < n and asyncio.get_running_loop().time() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(recs)
        return got
    finally:
        await consumer.stop()


async def test_declare_moves_an_existing_topic_to_the_brokers_clock(base_settings: Settings) -> None:
    s = base_settings
    requests = s.topics.tenant("acme").requests("chat")
    # As an older ragbus (or an operator) left it: the producer's time, a shorter retention, and an
    # override of the operator's own that the declaration does not name.
    await _create(
        s,
        requests,
        {"message.timestamp.type": "CreateTime", "retention.ms": "60000", "segment.ms": "7200000"},
    )
    await _send_at(s, requests, [(b"before", EPOCH_MS)])

    first = await declare_topics(s, tenants=["acme"])
    assert requests in first.existing and len(first.created) == len(TOPICS) - 1
    declared = spec("chat.requests").configs()
    # Everything declared that differed (cleanup.policy was already the default "delete").
    assert first.reconfigured == {requests: {k: v for k, v in declared.items() if k != "cleanup.policy"}}
    configs = await _topic_configs(s, requests)
    assert configs["message.timestamp.type"] == "LogAppendTime"
    assert configs["retention.ms"] == str(spec("chat.requests").retention_ms)
    assert configs["segment.ms"] == "7200000"  # incremental: what was not declared is kept
    for name in (s.topics.dlq(requests), s.topics.tenant("acme").tokens):  # created ones too, DLQs included
        assert (await _topic_configs(s, name))["message.timestamp.type"] == "LogAppendTime"
    assert (await declare_topics(s, tenants=["acme"])).reconfigured == {}  # idempotent

    before = datetime.now(UTC) - timedelta(seconds=5)
    await _send_at(s, requests, [(b"after", EPOCH_MS), (b"future", YEAR_2999_MS)])
    old, *stamped = await _first_records(s, requests, 3)
    # The record from before keeps the time the producer gave it; the later ones carry the
    # broker's clock whatever the producer asked for.
    assert (old.value, old.timestamp_type, old.timestamp) == (b"before", CREATE_TIME, EPOCH_MS)
    for r in stamped:
        assert r.timestamp_type == LOG_APPEND_TIME
        assert before <= datetime.fromtimestamp(r.timestamp / 1000, UTC) <= datetime.now(UTC)


async def _partitions(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'audit_log'::regclass"
        )
        return sorted(r[0] for r in rows)
    finally:
        await conn.close()


async def test_hostile_producer_times_land_at_now(settings: Settings) -> None:
    requests = settings.topics.tenant("acme").requests("chat")
    # A topic this ragbus did not declare, still on the producer's clock and (like brokers before
    # Kafka 4.0) accepting any producer time: the sink's receive time has to stand in.
    legacy = f"{settings.topic_prefix}.models.updates"
    await _create(
        settings,
        legacy,
        {"message.timestamp.type": "CreateTime", "message.timestamp.after.max.ms": ANY_TIME},
    )

    def event(request_id: str) -> bytes:
        return encode(ChatRequest(question="when?", tenant_id="acme", request_id=request_id)).value

    sent = [(event("t-1970"), EPOCH_MS), (event("t-2999"), YEAR_2999_MS)]
    await _send_at(settings, requests, sent)
    await _send_at(settings, legacy, [(b'{"request_id": "l-1970"}', EPOCH_MS), (b"garbage", YEAR_2999_MS)])

    sink = AuditSink(settings, metadata_max_age_ms=1000)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    try:
        await wait_for(lambda: _at_least(settings.postgres_dsn, 4), what="4 audit rows")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    now = datetime.now(UTC)

    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        rows = await conn.fetch(
            'SELECT topic, "offset", created_at, producer_time, time_source FROM audit_log ORDER BY 1, 2'
        )
        # What `ragbus audit --since 5m` runs.
        found = await fetch_entries(conn, AuditFilter(since=parse_when("5m"), limit=100), None)
    finally:
        await conn.close()
    assert len(rows) == 4
    for r in rows:
        assert abs(r["created_at"] - now) < timedelta(minutes=1), r
    by_topic = {(r["topic"], r["offset"]): r for r in rows}
    for offset in (0, 1):
        assert by_topic[(requests, offset)]["time_source"] == FROM_BROKER
        assert by_topic[(requests, offset)]["producer_time"] is None  # the broker overwrote it
    assert [
        (by_topic[(legacy, o)]["time_source"], by_topic[(legacy, o)]["producer_time"]) for o in (0, 1)
    ] == [
        (FROM_RECEIPT, datetime(1970, 1, 1, tzinfo=UTC)),
        (FROM_RECEIPT, datetime(2999, 12, 31, tzinfo=UTC)),
    ]
    assert sorted((e.topic, e.offset) for e in found) == sorted(by_topic)
    assert {"t-1970", "t-2999", "l-1970"} <= {e.request_id for e in found}

    partitions = await _partitions(settings.postgres_dsn)
    assert f"audit_log_y{now:%Y}m{now:%m}" in partitions
    assert not [
        p for p in partitions if p.startswith(("audit_log_y1970", "audit_log_y2999", "audit_log_y3000"))
    ]

    # A fresh group re-reads all four: broker-timed rows meet their primary key again, the
    # receive-timed ones (new receive times) are recognised by their coordinates.
    replay = AuditSink(settings, metadata_max_age_ms=1000)
    replay.group_id = f"{settings.topic_prefix}.audit-replay"
    stop = asyncio.Event()
    task = asyncio.create_task(replay.run(stop))
    try:
        await wait_for(lambda: _replayed(replay, 4), what="the replay")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    assert (replay.stats.inserted, replay.stats.duplicates) == (0, 4)
    assert await row_count(settings.postgres_dsn) == 4


async def _at_least(dsn: str, n: int) -> bool:
    return await row_count(dsn) >= n


async def _replayed(sink: AuditSink, n: int) -> bool:
    return sink.stats.duplicates >= n


async def test_the_writer_never_makes_a_partition_for_an_absurd_month(settings: Settings) -> None:
    writer = AuditWriter(settings.postgres_dsn)
    await writer.prepare()
    try:
        before = await _partitions(settings.postgres_dsn)
        await writer.ensure_months({datetime(1970, 1, 1, tzinfo=UTC), datetime(2999, 12, 1, tzinfo=UTC)})
        assert await _partitions(settings.postgres_dsn) == before
        # Receive-timed rows written twice (two receive times) are stored once.
        mapper = RowMapper("ragbus")
        records = [
            Rec("ragbus.chat.requests", b'{"tenant_id": "acme"}', offset=i, timestamp=0) for i in range(20)
        ]
        first = await writer.write(mapper.rows(records, datetime.now(UTC)))
        again = await writer.write(mapper.rows(records, datetime.now(UTC) + timedelta(seconds=1)))
        assert (first.inserted, again.inserted, again.duplicates) == (20, 0, 20)
    finally:
        await writer.close()
