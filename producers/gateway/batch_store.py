"""Rows of the Files and Batch API in Postgres (migration 0009_batches), on the gateway's role.

Every query names the tenant: a file or batch of another tenant is not found, whatever id a key
sends. Which gateway runs a batch is decided by Postgres too: the runner holds a session-level
advisory lock on the batch id on a connection of its own (`BatchLease`) for as long as it runs
it. A gateway that dies (even SIGKILLed) closes that connection and so lets the lock go; another
gateway's sweep then takes the batch over — at most one runs it at any time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from infra.settings import Settings
from producers.openai.batches import (
    UNFINISHED,
    Batch,
    BatchErrors,
    BatchRequestCounts,
    BatchStatus,
    FileObject,
)

#: The advisory-lock namespace of batches (hashed with the id to the lock's 64-bit key).
_LOCK_NS = "ragbus.batch:"


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def file_object(row: asyncpg.Record) -> FileObject:
    return FileObject(
        id=row["id"],
        bytes=row["bytes"],
        created_at=int(row["created_at"].timestamp()),
        filename=row["filename"],
        purpose=row["purpose"],
    )


def batch_object(row: asyncpg.Record) -> Batch:
    errors = row["errors"]
    return Batch(
        id=row["id"],
        endpoint=row["endpoint"],
        errors=BatchErrors.model_validate(json.loads(errors)) if errors else None,
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        status=row["status"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        created_at=int(row["created_at"].timestamp()),
        in_progress_at=_ts(row["in_progress_at"]),
        expires_at=_ts(row["expires_at"]),
        finalizing_at=_ts(row["finalizing_at"]),
        completed_at=_ts(row["completed_at"]),
        failed_at=_ts(row["failed_at"]),
        expired_at=_ts(row["expired_at"]),
        cancelling_at=_ts(row["cancelling_at"]),
        cancelled_at=_ts(row["cancelled_at"]),
        request_counts=BatchRequestCounts(
            total=row["total"], completed=row["completed"], failed=row["failed"]
        ),
        metadata=json.loads(row["metadata"]) if row["metadata"] else None,
    )


#: The time column each status sets when a batch enters it.
_STAMP: dict[str, str] = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


class BatchStore:
    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn

    @classmethod
    async def open(cls, settings: Settings) -> BatchStore:
        """A store on the gateway's own Postgres role; refuses a database without the batch tables."""
        from infra.postgres.pool import create_checked_pool

        dsn = settings.postgres_dsn_for("gateway")
        pool = await create_checked_pool(settings, dsn=dsn, needed_by="a gateway with batches")
        return cls(pool, dsn)

    async def close(self) -> None:
        await self.pool.close()

    # --- files -------------------------------------------------------------------------------
    async def add_file(self, file_id: str, tenant: str, purpose: str, filename: str, size: int) -> FileObject:
        row = await self.pool.fetchrow(
            """INSERT INTO batch_files (id, tenant, purpose, filename, bytes) VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (id) DO UPDATE SET bytes = EXCLUDED.bytes WHERE batch_files.tenant = $2
               RETURNING *""",
            file_id,
            tenant,
            purpose,
            filename,
            size,
        )
        assert row is not None
        return file_object(row)

    async def get_file(self, tenant: str, file_id: str) -> FileObject | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM batch_files WHERE id = $1 AND tenant = $2", file_id, tenant
        )
        return file_object(row) if row is not None else None

    async def list_files(
        self, tenant: str, *, purpose: str | None, after: str | None, limit: int
    ) -> list[FileObject]:
        rows = await self.pool.fetch(
            """SELECT * FROM batch_files f WHERE tenant = $1 AND ($2::text IS NULL OR purpose = $2)
                 AND ($3::text IS NULL OR (created_at, id) <
                      (SELECT created_at, id FROM batch_files WHERE id = $3 AND tenant = $1))
               ORDER BY created_at DESC, id DESC LIMIT $4""",
            tenant,
            purpose,
            after,
            limit,
        )
        return [file_object(r) for r in rows]

    async def file_in_use(self, tenant: str, file_id: str) -> bool:
        """Whether an unfinished batch reads the file (it may not be deleted under it)."""
        return bool(
            await self.pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM batches WHERE tenant = $1 AND input_file_id = $2 "
                "AND status = ANY($3::text[]))",
                tenant,
                file_id,
                list(UNFINISHED),
            )
        )

    async def delete_file(self, tenant: str, file_id: str) -> bool:
        done = await self.pool.execute(
            "DELETE FROM batch_files WHERE id = $1 AND tenant = $2", file_id, tenant
        )
        return done.endswith(" 1")

    # --- batches -----------------------------------------------------------------------------
    async def add_batch(
        self,
        batch_id: str,
        tenant: str,
        user_id: str,
        *,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        expires_in: timedelta,
    ) -> Batch:
        """A new batch, `validating`, to be finished within `expires_in` of now (then `expired`)."""
        row = await self.pool.fetchrow(
            """INSERT INTO batches (id, tenant, user_id, endpoint, input_file_id, completion_window,
                                    status, metadata, expires_at)
               VALUES ($1, $2, $3, $4, $5, $6, 'validating', $7::jsonb, $8) RETURNING *""",
            batch_id,
            tenant,
            user_id,
            endpoint,
            input_file_id,
            completion_window,
            json.dumps(metadata) if metadata is not None else None,
            datetime.now(UTC) + expires_in,
        )
        assert row is not None
        return batch_object(row)

    async def get_batch(self, tenant: str, batch_id: str) -> Batch | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM batches WHERE id = $1 AND tenant = $2", batch_id, tenant
        )
        return batch_object(row) if row is not None else None

    async def batch_row(self, batch_id: str) -> asyncpg.Record | None:
        """The whole row (the runner's view: tenant and user included)."""
        return await self.pool.fetchrow("SELECT * FROM batches WHERE id = $1", batch_id)

    async def list_batches(self, tenant: str, *, after: str | None, limit: int) -> list[Batch]:
        rows = await self.pool.fetch(
            """SELECT * FROM batches WHERE tenant = $1
                 AND ($2::text IS NULL OR (created_at, id) <
                      (SELECT created_at, id FROM batches WHERE id = $2 AND tenant = $1))
               ORDER BY created_at DESC, id DESC LIMIT $3""",
            tenant,
            after,
            limit,
        )
        return [batch_object(r) for r in rows]

    async def request_cancel(self, tenant: str, batch_id: str) -> Batch | None:
        """Mark an unfinished batch `cancelling` (its runner sees it within a poll); a finished
        one is returned as it is."""
        row = await self.pool.fetchrow(
            """UPDATE batches SET status = 'cancelling', cancelling_at = now()
               WHERE id = $1 AND tenant = $2 AND status IN ('validating', 'in_progress')
               RETURNING *""",
            batch_id,
            tenant,
        )
        if row is None:
            return await self.get_batch(tenant, batch_id)
        return batch_object(row)

    async def unfinished(self, tenants: Sequence[str]) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT id FROM batches WHERE status = ANY($1::text[]) AND tenant = ANY($2::text[]) "
            "ORDER BY created_at",
            list(UNFINISHED),
            list(tenants),
        )
        return [r["id"] for r in rows]


class BatchLease:
    """The right to run one batch: a session advisory lock on its own connection, which also
    carries the runner's progress writes — so a runner that lost its connection (and with it the
    lock) fails its next write and stops, rather than run on beside a gateway that took over."""

    def __init__(self, conn: asyncpg.Connection, batch_id: str) -> None:
        self.conn = conn
        self.batch_id = batch_id

    @classmethod
    async def take(cls, store: BatchStore, batch_id: str) -> BatchLease | None:
        conn = await asyncpg.connect(store.dsn)
        try:
            got = await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", _LOCK_NS + batch_id
            )
        except BaseException:
            await conn.close()
            raise
        if not got:
            await conn.close()
            return None
        return cls(conn, batch_id)

    async def release(self) -> None:
        try:
            await self.conn.close()  # closing the session lets the lock go
        except Exception:  # noqa: BLE001 - a dead connection has let it go already
            self.conn.terminate()

    async def row(self) -> asyncpg.Record:
        row = await self.conn.fetchrow("SELECT * FROM batches WHERE id = $1", self.batch_id)
        assert row is not None, self.batch_id
        return row

    async def progress(self, *, total: int, completed: int, failed: int) -> BatchStatus:
        """Save the request counts; returns the status (a `cancelling` set by any gateway)."""
        status = await self.conn.fetchval(
            "UPDATE batches SET total = $2, completed = $3, failed = $4 WHERE id = $1 RETURNING status",
            self.batch_id,
            total,
            completed,
            failed,
        )
        return status  # type: ignore[no-any-return]

    async def set_status(self, status: BatchStatus, **fields: Any) -> BatchStatus:
        """Move the batch to `status` (stamping its time) with `fields`; a batch being cancelled
        stays `cancelling` when asked to go `in_progress`. Returns the status it now has."""
        sets = ["status = CASE WHEN status = 'cancelling' AND $2 = 'in_progress' THEN status ELSE $2 END"]
        args: list[Any] = [self.batch_id, status]
        stamp = _STAMP.get(status)
        if stamp is not None:
            sets.append(f"{stamp} = coalesce({stamp}, now())")
        for name, value in fields.items():
            if name not in {"total", "completed", "failed", "output_file_id", "error_file_id", "errors"}:
                raise ValueError(f"not a batch field: {name}")
            args.append(json.dumps(value) if name == "errors" and value is not None else value)
            sets.append(f"{name} = ${len(args)}" + ("::jsonb" if name == "errors" else ""))
        return await self.conn.fetchval(  # type: ignore[no-any-return]
            f"UPDATE batches SET {', '.join(sets)} WHERE id = $1 RETURNING status", *args
        )
