"""The least-privilege Postgres roles of ragbus: the audit sink may only add rows, the readers may
only read them, the gateway may only read quota limits, add to quota counters and keep the Batch
API's file and batch rows; only migrations (and retention) act as the owner.

Migrations 0007 and 0008 create the roles (NOLOGIN) and grant what each needs (0009 adds the
gateway's batch tables); on the local server
`ragbus up` then gives them a login and a password generated once and kept 0600 under the home
(`infra.secrets.postgres_password_path`), which `Settings.postgres_dsn_for` reads. An external
server's administrator sets their passwords and names them in `pg_sink_dsn` / `pg_reader_dsn` /
`pg_gateway_dsn`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

    from infra.settings import PgRole, Settings

#: May INSERT into audit_log (and run the SECURITY DEFINER partition and replay functions).
SINK_ROLE = "ragbus_sink"
#: May SELECT audit_log and its partitions.
READER_ROLE = "ragbus_reader"
#: May SELECT quota_limits, SELECT/INSERT/UPDATE quota_counters (the gateway's quotas) and keep
#: batch_files and batches (the Batch API; no DELETE of batches).
GATEWAY_ROLE = "ragbus_gateway"
ROLE_NAMES: dict[PgRole, str] = {"sink": SINK_ROLE, "reader": READER_ROLE, "gateway": GATEWAY_ROLE}


async def ensure_login_roles(conn: asyncpg.Connection, settings: Settings) -> None:
    """Let the least-privilege roles log in with their stored passwords, generating each once.

    Idempotent: an existing password file is reused (and set again, which also repairs a role
    whose password was changed behind ragbus's back). Runs as the owner, after the migrations."""
    from infra.secrets import generate_password, postgres_password_path, read_secret, write_secret

    for role in ROLE_NAMES.values():
        path = postgres_password_path(settings, role)
        password = read_secret(path)
        if password is None:
            password = generate_password()
            write_secret(path, password)
        # Utility statements take no parameters: let the server quote (format %I / %L) instead.
        statement = await conn.fetchval(
            "SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)", role, password
        )
        await conn.execute(statement)
