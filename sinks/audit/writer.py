"""Writes batches of audit rows: COPY into a per-connection staging table, then
`INSERT … SELECT … ON CONFLICT DO NOTHING` into `audit_log`, in one transaction.

COPY is the fast path into Postgres but fails a whole batch on one duplicate; staging first and
inserting with ON CONFLICT keeps COPY's speed and makes a replayed batch a no-op, which is what
lets the sink commit Kafka offsets only after Postgres commits (at-least-once delivery, stored
exactly once). A row Postgres refuses (a value its types cannot hold) is found by bisection and
replaced by an `unstorable` row carrying its content as base64, so one bad row never blocks the
partition. Any other failure drops the connection and propagates: the sink retries the batch.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import asyncpg.exceptions._base as pg_base

from infra.postgres.migrations import migrate, require_current
from sinks.audit.rows import COLUMNS, Row, unstorable

log = logging.getLogger(__name__)

STAGE = "audit_stage"
_TYPES = {
    "created_at": "timestamptz",
    "producer_time": "timestamptz",
    "partition": "integer",
    "offset": "bigint",
    "ip_address": "inet",
    "prompt_tokens": "integer",
    "completion_tokens": "integer",
    "request_payload": "jsonb",
}
_COLS = ", ".join(f'"{c}"' for c in COLUMNS)
CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} ("
    + ", ".join(f'"{c}" {_TYPES.get(c, "text")}' for c in COLUMNS)
    + ") ON COMMIT DELETE ROWS"
)
INSERT = f"INSERT INTO audit_log ({_COLS}) SELECT {_COLS} FROM {STAGE} ON CONFLICT DO NOTHING"


def refused(err: BaseException) -> bool:
    """Whether Postgres (or asyncpg's encoder) rejected the data itself, not the connection:
    data exceptions (SQLSTATE 22), integrity violations (23), limits exceeded (54), and values
    asyncpg cannot encode (it raises ValueError/TypeError/OverflowError for those)."""
    if isinstance(err, pg_base.DataError | ValueError | TypeError | OverflowError):
        return True
    return isinstance(err, asyncpg.PostgresError) and str(getattr(err, "sqlstate", "")).startswith(
        ("22", "23", "54")
    )


def month_of(ts: datetime) -> datetime:
    """The first instant of `ts`'s month (UTC); rows' created_at are UTC already."""
    ts = ts.astimezone(UTC)
    return datetime(ts.year, ts.month, 1, tzinfo=UTC)


@dataclass
class WriteResult:
    inserted: int
    #: Rows already present (a replay after a crash or rebalance).
    duplicates: int
    #: Rows Postgres refused, stored as `unstorable` stand-ins.
    replaced: int = 0


class AuditWriter:
    def __init__(self, dsn: str, *, timeout: float = 60.0, may_migrate: bool = True) -> None:
        self.dsn = dsn
        #: False when `dsn` is a least-privilege role: then the schema must be current already.
        self.may_migrate = may_migrate
        self.timeout = timeout
        self._conn: asyncpg.Connection | None = None
        self._months: set[datetime] = set()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def connect(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await asyncpg.connect(self.dsn, timeout=10, command_timeout=self.timeout)
            try:
                await conn.execute(CREATE_STAGE)
            except BaseException:
                conn.terminate()
                raise
            self._conn = conn
        return self._conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def prepare(self) -> None:
        """Apply migrations (or, as the sink's least-privilege role, check that none is pending) and
        make sure this month's and next month's partitions exist."""
        conn = await self.connect()
        try:
            if self.may_migrate:
                await migrate(conn)
            else:
                await require_current(conn, "the audit sink")
            now = datetime.now(UTC)
            await self.ensure_months({month_of(now), month_of(month_of(now) + timedelta(days=32))})
        except BaseException:
            self._drop()
            raise

    async def ensure_months(self, months: set[datetime]) -> None:
        missing = months - self._months
        if not missing:
            return
        conn = await self.connect()
        for month in sorted(missing):
            name = await conn.fetchval("SELECT audit_log_ensure_partition($1)", month)
            log.debug("audit partition %s ready", name)
            self._months.add(month)

    async def write(self, rows: list[Row]) -> WriteResult:
        """Store `rows` durably (the transaction has committed when this returns)."""
        if not rows:
            return WriteResult(0, 0)
        try:
            await self.ensure_months(
                {datetime(y, m, 1, tzinfo=UTC) for y, m in {(r[0].year, r[0].month) for r in rows}}
            )
            conn = await self.connect()
            try:
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        STAGE, records=rows, columns=COLUMNS, timeout=self.timeout
                    )
                    status = await conn.execute(INSERT, timeout=self.timeout)
                replaced = 0
            except Exception as err:
                if not refused(err):
                    raise
                log.warning("Postgres refused a row of a batch of %d (%s); isolating it", len(rows), err)
                async with conn.transaction():
                    replaced = await self._stage_isolating(conn, rows)
                    status = await conn.execute(INSERT, timeout=self.timeout)
        except BaseException:
            self._drop()
            raise
        inserted = int(status.rsplit(" ", 1)[-1])
        return WriteResult(inserted, len(rows) - inserted, replaced)

    async def _stage_isolating(self, conn: asyncpg.Connection, rows: list[Row]) -> int:
        """COPY `rows` in halves inside savepoints until each refused row is alone, and stage its
        stand-in instead. Returns how many rows were replaced."""
        try:
            async with conn.transaction():
                await conn.copy_records_to_table(STAGE, records=rows, columns=COLUMNS, timeout=self.timeout)
            return 0
        except Exception as err:
            if not refused(err):
                raise
            if len(rows) == 1:
                row = rows[0]
                log.error("audit row %s/%s@%s refused by Postgres: %s", row[1], row[2], row[3], err)
                await conn.copy_records_to_table(
                    STAGE, records=[unstorable(row, str(err))], columns=COLUMNS, timeout=self.timeout
                )
                return 1
            mid = len(rows) // 2
            return await self._stage_isolating(conn, rows[:mid]) + await self._stage_isolating(
                conn, rows[mid:]
            )
