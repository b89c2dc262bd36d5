"""The Postgres the project starts is a real server; migrations apply once, in order."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import psutil
import pytest

from infra.postgres.migrations import MigrationError, migrate
from infra.settings import Settings
from tests.provision import PostgresService


async def test_server_is_real_postgres(postgres: PostgresService, settings: Settings) -> None:
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        version = await conn.fetchval("SHOW server_version_num")
        assert int(version) >= 150000
        assert await conn.fetchval("SHOW fsync") == "on"
    finally:
        await conn.close()
    if postgres.local is not None:
        assert psutil.Process(postgres.local.pid).name() == "postgres"


async def test_migrations_apply_once_in_order(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "0001_create.sql").write_text("CREATE TABLE notes (id int PRIMARY KEY, body text);")
    (tmp_path / "0002_seed.sql").write_text("INSERT INTO notes VALUES (1, 'first');")
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        applied = await migrate(conn, tmp_path)
        assert [m.version for m in applied] == [1, 2]
        assert await migrate(conn, tmp_path) == []
        assert await conn.fetchval("SELECT count(*) FROM notes") == 1
        rows = await conn.fetch("SELECT version, name FROM ragbus_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == [(1, "create"), (2, "seed")]

        (tmp_path / "0002_seed.sql").write_text("INSERT INTO notes VALUES (2, 'edited');")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, tmp_path)

        (tmp_path / "0002_seed.sql").write_text("INSERT INTO notes VALUES (1, 'first');")
        (tmp_path / "0003_broken.sql").write_text("INSERT INTO notes VALUES (3, 'x'); SELECT * FROM nowhere;")
        with pytest.raises(asyncpg.UndefinedTableError):
            await migrate(conn, tmp_path)
        # A failing migration leaves nothing half-applied.
        assert await conn.fetchval("SELECT count(*) FROM notes") == 1
        assert await conn.fetchval("SELECT max(version) FROM ragbus_migrations") == 2
    finally:
        await conn.close()


async def test_shipped_migrations_apply(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await migrate(conn)
        await migrate(conn)
    finally:
        await conn.close()
