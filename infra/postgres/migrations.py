"""Plain SQL migrations (`NNNN_name.sql`), applied in order, each in its own transaction, and
recorded in `ragbus_migrations`. An advisory lock serializes concurrent appliers; an applied file
whose text changed is refused rather than silently skipped."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x7261_6762_7573  # "ragbus"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(RuntimeError):
    pass


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lower_snake.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path.read_text()))
    versions = [m.version for m in found]
    if len(versions) != len(set(versions)):
        raise MigrationError(f"duplicate migration versions in {directory}")
    return found


async def pending(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations not yet applied, read without changing anything (so a least-privilege role
    such as the audit sink's can check that the schema is current before it writes)."""
    found = discover(directory)
    if await conn.fetchval("SELECT to_regclass('ragbus_migrations')") is None:
        return found
    done = {r["version"] for r in await conn.fetch("SELECT version FROM ragbus_migrations")}
    return [m for m in found if m.version not in done]


async def require_current(conn: asyncpg.Connection, needed_by: str) -> None:
    """Raise a MigrationError that says what to run when a migration is pending: the check a
    least-privilege role (the sink's, the gateway's) makes before it relies on the schema."""
    if missing := await pending(conn):
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in missing)
        raise MigrationError(
            f"the database lacks migrations {names}: run `ragbus up` (it migrates as the database "
            f"owner) before {needed_by} starts"
        )


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply the pending migrations; returns those applied now."""
    pending = discover(directory)
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS ragbus_migrations (
               version integer PRIMARY KEY,
               name text NOT NULL,
               checksum text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        done = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM ragbus_migrations")
        }
        for m in pending:
            if m.version in done:
                if done[m.version] != m.checksum:
                    raise MigrationError(f"migration {m.version:04d}_{m.name} changed after it was applied")
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO ragbus_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            log.info("applied migration %04d_%s", m.version, m.name)
            applied_now.append(m)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
