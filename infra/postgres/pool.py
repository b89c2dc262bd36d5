"""asyncpg connection pools from settings."""

from __future__ import annotations

import asyncpg

from infra.settings import Settings


async def create_pool(settings: Settings, *, dsn: str | None = None, **kw: object) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn or settings.postgres_dsn,
        min_size=1,
        max_size=settings.pg_pool_max,
        command_timeout=60,
        **kw,  # type: ignore[arg-type]
    )
