"""asyncpg connection pools from settings."""

from __future__ import annotations

import asyncpg

from infra.postgres.migrations import require_current
from infra.settings import Settings


async def create_pool(settings: Settings, *, dsn: str | None = None, **kw: object) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn or settings.postgres_dsn,
        min_size=1,
        max_size=settings.pg_pool_max,
        command_timeout=60,
        **kw,  # type: ignore[arg-type]
    )


async def create_checked_pool(settings: Settings, *, dsn: str, needed_by: str) -> asyncpg.Pool:
    """A pool on a role that may not migrate, refusing (MigrationError, closed) a database whose
    schema is behind this code."""
    pool = await create_pool(settings, dsn=dsn)
    try:
        async with pool.acquire() as conn:
            await require_current(conn, needed_by)
    except BaseException:
        await pool.close()
        raise
    return pool
