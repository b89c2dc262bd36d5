"""The audit writer against real Postgres: idempotent batches, rows Postgres refuses isolated
and kept, monthly partitions created ahead or late, retention by dropping months."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from infra.kafka.codec import encode
from infra.settings import Settings
from schemas import ChatRequest
from sinks.audit.partitions import drop_before, list_partitions
from sinks.audit.rows import COL, LOG_APPEND_TIME, RowMapper
from sinks.audit.writer import AuditWriter, month_of
from tests.unit.test_audit_rows import Rec

#: A month long enough ago to have no partition yet, recent enough for a broker time to count.
LATE = month_of(datetime.now(UTC) - timedelta(days=320))
LATE_MS = int((LATE + timedelta(days=16)).timestamp() * 1000)
HOUR_AGO_MS = int((datetime.now(UTC) - timedelta(hours=1)).timestamp() * 1000)


def _rows(n: int, *, timestamp: int = HOUR_AGO_MS, partition: int = 0) -> list[tuple]:  # type: ignore[type-arg]
    """Rows of broker-stamped (LogAppendTime) records, as ragbus topics carry them."""
    mapper = RowMapper("ragbus")
    out = []
    for i in range(n):
        enc = encode(ChatRequest(question=f"q{i}", tenant_id="acme", request_id=f"r{i}"))
        record = Rec(
            "ragbus.chat.requests",
            enc.value,
            partition=partition,
            offset=i,
            timestamp=timestamp,
            timestamp_type=LOG_APPEND_TIME,
        )
        out.append(mapper.row(record))
    return out


async def test_batches_are_idempotent_and_refused_rows_are_kept(settings: Settings) -> None:
    writer = AuditWriter(settings.postgres_dsn)
    await writer.prepare()
    try:
        rows = _rows(50)
        first = await writer.write(rows)
        assert (first.inserted, first.duplicates, first.replaced) == (50, 0, 0)
        again = await writer.write(rows[10:] + _rows(5, partition=1))  # a replay plus new records
        assert (again.inserted, again.duplicates) == (5, 40)

        bad_ip = list(_rows(1, partition=2)[0])
        bad_ip[COL["ip_address"]] = "not an address"  # asyncpg cannot encode it
        bad_json = list(_rows(2, partition=2)[1])
        bad_json[COL["request_payload"]] = '{"a": NaN}'  # Postgres refuses it
        mixed = [tuple(bad_ip), tuple(bad_json), *_rows(20, partition=3)]
        result = await writer.write(mixed)
        assert (result.inserted, result.replaced) == (22, 2)
    finally:
        await writer.close()

    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 77
        kept = await conn.fetch(
            'SELECT "offset", error, request_payload::text AS p FROM audit_log '
            'WHERE "partition" = 2 ORDER BY 1'
        )
    finally:
        await conn.close()
    assert [r["offset"] for r in kept] == [0, 1] and all(r["error"].startswith("unstorable") for r in kept)
    blob = orjson.loads(base64.b64decode(orjson.loads(kept[1]["p"])["unstorable_b64"]))
    assert blob["payload"] == '{"a": NaN}' and blob["columns"]["request_id"] == "r1"


async def test_months_get_partitions_even_late_and_retention_drops_them(settings: Settings) -> None:
    writer = AuditWriter(settings.postgres_dsn)
    await writer.prepare()
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        names = [p.name for p in await list_partitions(conn)]
        now = datetime.now(UTC)
        assert f"audit_log_y{now:%Y}m{now:%m}" in names and names[-1] == "audit_log_default"
        # A row of a month without a partition lands in the default partition...
        early = _rows(1, timestamp=LATE_MS, partition=9)[0]
        cols = ", ".join(
            f'"{c}"' for c in ("created_at", "topic", "partition", "offset", "action_type", "request_payload")
        )
        await conn.execute(
            f"INSERT INTO audit_log ({cols}) VALUES ($1, $2, $3, $4, 'QUERY', '{{}}')",
            *(early[COL[c]] for c in ("created_at", "topic", "partition", "offset")),
        )
        # ...and moves into the month's own partition when the writer meets that month.
        result = await writer.write(_rows(3, timestamp=LATE_MS, partition=9))
        assert (result.inserted, result.duplicates) == (2, 1)
        where = dict(await conn.fetch("SELECT tableoid::regclass::text, count(*) FROM audit_log GROUP BY 1"))
        assert where == {f"audit_log_y{LATE:%Y}m{LATE:%m}": 3}

        doomed = await drop_before(conn, month_of(LATE + timedelta(days=32)))
        assert [p.name for p in doomed] == [f"audit_log_y{LATE:%Y}m{LATE:%m}"]
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 0
        assert "audit_log_default" in [p.name for p in await list_partitions(conn)]
    finally:
        await conn.close()
        await writer.close()
