"""Postgres authenticates everyone and components hold least privilege, on the real server.

The local server (the one `ragbus up` and the test session start) takes no connection without the
owner's SCRAM password, on TCP as on its socket; the audit sink's role may only add rows and the
readers' may only read them, whatever SQL either sends."""

from __future__ import annotations

import asyncio
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest
from pydantic import SecretStr

from infra.kafka.codec import encode
from infra.postgres.migrations import migrate
from infra.postgres.roles import READER_ROLE, SINK_ROLE, ensure_login_roles
from infra.postgres.server import LocalPostgres
from infra.procs import free_port
from infra.secrets import postgres_password_path, read_secret, secrets_dir
from infra.settings import Settings
from schemas import ChatRequest
from sinks.audit.rows import LOG_APPEND_TIME, RowMapper
from sinks.audit.sink import AuditSink
from sinks.audit.writer import month_of
from tests.provision import PostgresService
from tests.unit.test_audit_rows import Rec

#: A password file that does not exist, so no ~/.pgpass can supply the password under test.
NO_PASSFILE = str(Path(__file__).with_name("no-such-pgpass"))
REFUSED = (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError)


def _as(dsn: str, user: str, password: str | None) -> str:
    """`dsn` with another user and password (None: no password at all)."""
    parts = urlsplit(dsn)
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    return urlunsplit(parts._replace(netloc=f"{auth}@{parts.hostname}:{parts.port}"))


def _local(postgres: PostgresService) -> LocalPostgres:
    if postgres.local is None:
        pytest.skip("the server is not the project's own (RAGBUS_TEST_PG_DSN or Docker)")
    return postgres.local


async def _connect(dsn: str, **kw: Any) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=10, passfile=NO_PASSFILE, **kw)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_connections_need_the_password(postgres: PostgresService, settings: Settings) -> None:
    server = _local(postgres)
    owner = server.user
    for dsn in (_as(postgres.dsn, owner, None), _as(postgres.dsn, owner, "wrong-password")):
        with pytest.raises(REFUSED):
            await _connect(dsn)
    # The socket is held to the same rule, and only the server's user may reach it.
    with pytest.raises(REFUSED):
        await _connect(f"postgresql://{owner}@/postgres", host=str(server.socket_dir), port=server.port)
    assert _mode(server.socket_dir) == 0o700
    assert not server.trusts() and "scram-sha-256" in (server.data_dir / "pg_hba.conf").read_text()

    conn = await _connect(postgres.dsn)
    try:
        assert await conn.fetchval("SHOW password_encryption") == "scram-sha-256"
    finally:
        await conn.close()
    conn = await _connect(
        f"postgresql://{owner}@/postgres",
        host=str(server.socket_dir),
        port=server.port,
        password=server.password,
    )
    await conn.close()
    assert _mode(server.password_file) == 0o600 and _mode(server.password_file.parent) == 0o700


@pytest.fixture
async def roles(settings: Settings) -> Settings:
    """The test's database migrated as the owner, as `ragbus up` does, and settings whose sink and
    reader connect as their least-privilege roles."""
    conn = await _connect(settings.postgres_dsn)
    try:
        await migrate(conn)
        await ensure_login_roles(conn, settings)
    finally:
        await conn.close()
    owner_dsn = settings.postgres_dsn
    sink_pw = read_secret(postgres_password_path(settings, SINK_ROLE))
    reader_pw = read_secret(postgres_password_path(settings, READER_ROLE))
    return settings.model_copy(
        update={
            "pg_sink_dsn": SecretStr(_as(owner_dsn, SINK_ROLE, sink_pw)),
            "pg_reader_dsn": SecretStr(_as(owner_dsn, READER_ROLE, reader_pw)),
        }
    )


def test_role_passwords_are_private_files(roles: Settings) -> None:
    for role in (SINK_ROLE, READER_ROLE):
        path = postgres_password_path(roles, role)
        assert _mode(path) == 0o600 and len(read_secret(path) or "") >= 32
        assert _mode(path.parent) == 0o700
    assert _mode(secrets_dir(roles)) == 0o700


async def test_ensure_login_roles_is_idempotent(roles: Settings) -> None:
    before = read_secret(postgres_password_path(roles, SINK_ROLE))
    conn = await _connect(roles.postgres_dsn)
    try:
        await migrate(conn)
        await ensure_login_roles(conn, roles)
    finally:
        await conn.close()
    assert read_secret(postgres_password_path(roles, SINK_ROLE)) == before
    conn = await _connect(roles.postgres_dsn_for("sink"))
    await conn.close()
    with pytest.raises(REFUSED):
        await _connect(_as(roles.postgres_dsn, SINK_ROLE, "not-its-password"))


def _rows(n: int, *, timestamp_ms: int, timestamp_type: int, partition: int) -> list[tuple[Any, ...]]:
    mapper = RowMapper("ragbus")
    return [
        mapper.row(
            Rec(
                "ragbus.chat.requests",
                encode(ChatRequest(question=f"q{i}", tenant_id="acme", request_id=f"r{i}")).value,
                partition=partition,
                offset=i,
                timestamp=timestamp_ms,
                timestamp_type=timestamp_type,
            )
        )
        for i in range(n)
    ]


async def test_the_sink_role_may_only_insert(roles: Settings) -> None:
    sink = AuditSink(roles)
    writer = sink.writer
    assert urlsplit(writer.dsn).username == SINK_ROLE and not writer.may_migrate
    await writer.prepare()  # partitions for this month and the next, through the owner's function
    try:
        now_ms = int((datetime.now(UTC) - timedelta(hours=1)).timestamp() * 1000)
        # A month with no partition yet: the writer creates it as the sink's role.
        late = month_of(datetime.now(UTC) - timedelta(days=320))
        late_ms = int((late + timedelta(days=16)).timestamp() * 1000)
        broker = _rows(5, timestamp_ms=now_ms, timestamp_type=LOG_APPEND_TIME, partition=0)
        dated = _rows(2, timestamp_ms=late_ms, timestamp_type=LOG_APPEND_TIME, partition=1)
        received = _rows(3, timestamp_ms=now_ms, timestamp_type=0, partition=2)  # CreateTime: trigger path
        result = await writer.write(broker + dated + received)
        assert (result.inserted, result.duplicates) == (10, 0)
        again = await writer.write(broker + _rows(3, timestamp_ms=now_ms, timestamp_type=0, partition=2))
        assert (again.inserted, again.duplicates) == (0, 8)  # replays dropped without a SELECT grant
    finally:
        await writer.close()

    conn = await _connect(roles.postgres_dsn_for("sink"))
    try:
        assert await conn.fetchval("SELECT current_user") == SINK_ROLE
        for sql in (
            "DELETE FROM audit_log",
            "UPDATE audit_log SET user_id = 'someone else'",
            "TRUNCATE audit_log",
            "DROP TABLE audit_log",
            f'DROP TABLE "audit_log_y{late:%Y}m{late:%m}"',
            "DELETE FROM audit_log_default",
            "SELECT count(*) FROM audit_log",
            "ALTER TABLE audit_log DISABLE TRIGGER audit_log_skip_replayed",
            "CREATE TABLE audit_copy (x int)",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
    finally:
        await conn.close()

    owner = await _connect(roles.postgres_dsn)
    try:
        assert await owner.fetchval("SELECT count(*) FROM audit_log") == 10
        where = await owner.fetchval(f'SELECT count(*) FROM "audit_log_y{late:%Y}m{late:%m}"')
        assert where == 2
    finally:
        await owner.close()


async def test_the_reader_role_may_only_select(roles: Settings) -> None:
    from cli.audit import _with_db
    from sinks.audit.partitions import list_partitions

    async def who_and_count(conn: asyncpg.Connection) -> tuple[str, int, int]:
        parts = await list_partitions(conn, exact=True)  # reads each partition directly
        return (
            await conn.fetchval("SELECT current_user"),
            await conn.fetchval("SELECT count(*) FROM audit_log"),
            len(parts),
        )

    # `ragbus audit` / `usage` / `sink partitions` connect through this, as the reader.
    user, rows, partitions = await asyncio.to_thread(_with_db, roles, who_and_count)
    assert (user, rows) == (READER_ROLE, 0) and partitions >= 5

    conn = await _connect(roles.postgres_dsn_for("reader"))
    try:
        for sql in (
            'INSERT INTO audit_log (created_at, topic, "partition", "offset", action_type, request_payload) '
            "VALUES (now(), 'x', 0, 0, 'QUERY', '{}')",
            "DELETE FROM audit_log",
            "UPDATE audit_log SET user_id = 'x'",
            "TRUNCATE audit_log",
            "DROP TABLE audit_log",
            "SELECT audit_log_ensure_partition(now())",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
    finally:
        await conn.close()


async def test_a_sink_role_refuses_an_unmigrated_schema(settings: Settings) -> None:
    """Without the owner's migrations the sink's role says what to run instead of failing later."""
    from infra.postgres.migrations import MigrationError

    conn = await _connect(settings.postgres_dsn)
    try:
        # Roles exist server-wide once any database is migrated; this database has no schema yet.
        await migrate(conn)
        await ensure_login_roles(conn, settings)
        await conn.execute("DELETE FROM ragbus_migrations WHERE version = 7")
    finally:
        await conn.close()
    password = read_secret(postgres_password_path(settings, SINK_ROLE))
    s = settings.model_copy(
        update={"pg_sink_dsn": SecretStr(_as(settings.postgres_dsn, SINK_ROLE, password))}
    )
    writer = AuditSink(s).writer
    with pytest.raises(MigrationError, match=r"lacks migrations 0007_roles.*ragbus up"):
        await writer.prepare()
    await writer.close()


async def test_a_server_that_trusted_is_migrated_to_passwords(tmp_path: Path) -> None:
    """A data folder initialised by an older ragbus (pg_hba `trust`, no password file) is secured
    on start: the owner gets a generated password and every connection must give it."""
    server = LocalPostgres(tmp_path / "old", port=free_port(), database="postgres")
    await asyncio.to_thread(server.init)
    hba = server.data_dir / "pg_hba.conf"
    hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    server.password_file.unlink()
    assert server.trusts()
    await asyncio.to_thread(server.start)
    try:
        assert not server.trusts() and _mode(server.password_file) == 0o600
        with pytest.raises(REFUSED):
            await _connect(_as(server.dsn, server.user, None))
        conn = await _connect(server.owner_dsn())
        try:
            assert await conn.fetchval("SELECT current_user") == server.user
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(server.stop)
