"""A running ragbus pipeline for integration tests: the components a user starts (`ragbus sink run`,
`worker run`, `processors run`, optionally `gateway`) as child processes against the session's
broker and Postgres, under a fresh topic prefix, database and Milvus collection.

Shared by the end-to-end tests and the hostile-input tests, so both exercise exactly the processes
the product runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from infra.kafka.topics import declare_topics
from infra.procs import free_port
from infra.settings import Settings
from tests.conftest import TEST_TENANTS, unique
from tests.helpers import spawn, wait_for
from tests.provision import KafkaService, PostgresService, create_database

#: The components of a pipeline and their `ragbus` arguments.
COMPONENTS: dict[str, list[str]] = {
    "sink": ["sink", "run"],
    "worker": ["worker", "run"],
    "processors": ["processors", "run"],
    "gateway": ["gateway"],
}


@dataclass
class Pipeline:
    settings: Settings
    root: Path
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for name in self.procs:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
            parts.append(f"--- {name} ---\n{text[-chars:]}")
        return "\n".join(parts)

    def assert_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{self.log_tail()}"

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}


async def pipeline_settings(
    kafka: KafkaService,
    postgres: PostgresService,
    root: Path,
    *,
    tenants: Sequence[str] = (),
    **overrides: Any,
) -> Settings:
    """Settings for a fresh deployment (own prefix, database, collection) with its topics declared:
    the shared ones, and those of `tenants` and of the test tenants (`TEST_TENANTS`)."""
    test_id = unique("p")
    await create_database(postgres.dsn, test_id)
    defaults: dict[str, Any] = {
        "kafka_bootstrap": kafka.bootstrap,
        "topic_prefix": test_id,
        "kafka_partitions": 2,
        "home": root / "home",
        "milvus_uri": os.environ.get("RAGBUS_TEST_MILVUS_URI") or str(root / "milvus.db"),
        "milvus_collection": f"c_{test_id}",
        "pg_dsn": SecretStr(postgres.dsn_for(test_id)),
        **kafka.client,  # the session broker's credentials, as in conftest
    }
    s = Settings(**{**defaults, **overrides}, _env_file=None)  # type: ignore[call-arg]
    await declare_topics(s, tenants=sorted({*TEST_TENANTS, *tenants}))
    return s


async def with_database_roles(settings: Settings) -> Settings:
    """As `ragbus up` does: migrate as the owner and give the least-privilege roles their
    passwords; returns the settings with the gateway's and the readers' own DSNs (what a gateway
    with quotas or batches, and `ragbus usage`, connect as)."""
    from urllib.parse import quote, urlsplit, urlunsplit

    import asyncpg

    from infra.postgres.migrations import migrate
    from infra.postgres.roles import GATEWAY_ROLE, READER_ROLE, ensure_login_roles
    from infra.secrets import postgres_password_path, read_secret

    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await migrate(conn)
        await ensure_login_roles(conn, settings)
    finally:
        await conn.close()

    def role_dsn(role: str) -> SecretStr:
        parts = urlsplit(settings.postgres_dsn)
        password = read_secret(postgres_password_path(settings, role))
        auth = quote(role, safe="") + (f":{quote(password, safe='')}" if password else "")
        return SecretStr(urlunsplit(parts._replace(netloc=f"{auth}@{parts.hostname}:{parts.port}")))

    return settings.model_copy(
        update={"pg_gateway_dsn": role_dsn(GATEWAY_ROLE), "pg_reader_dsn": role_dsn(READER_ROLE)}
    )


def write_keys(root: Path, *keys: tuple[str, str, str | None]) -> Path:
    """A gateway keys file under `root` (the format `RAGBUS_GATEWAY_KEYS_FILE` names) of
    (key, tenant, user or None) entries."""
    path = root / "keys.toml"
    path.write_text(
        "\n".join(
            f'[[keys]]\nkey = "{key}"\ntenant = "{tenant}"\n' + (f'user = "{user}"\n' if user else "")
            for key, tenant, user in keys
        )
    )
    return path


async def gateways_healthy(*urls: str) -> bool:
    """Whether every gateway at `urls` answers /healthz with 200 (not yet listening: False)."""
    try:
        async with httpx.AsyncClient() as http:
            return all([(await http.get(f"{url}/healthz")).status_code == 200 for url in urls])
    except httpx.HTTPError:
        return False


@asynccontextmanager
async def running_pipeline(
    settings: Settings,
    root: Path,
    components: list[str],
    *,
    ready: Callable[[Pipeline], Awaitable[bool]],
    ready_timeout: float = 120,
) -> AsyncIterator[Pipeline]:
    """Start `components`, wait until `ready(pipeline)`, yield; SIGTERM (then SIGKILL) at the end."""
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    p = Pipeline(settings, root, logs)
    try:
        for name in components:
            p.procs[name] = spawn(COMPONENTS[name], settings, logs / f"{name}.log")

        async def started() -> bool:
            p.assert_alive()
            return await ready(p)

        await wait_for(started, timeout=ready_timeout, what=f"{', '.join(components)} to start")
        yield p
    finally:
        for proc in p.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in p.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@asynccontextmanager
async def running_with_gateway(
    kafka: KafkaService,
    postgres: PostgresService,
    root: Path,
    *,
    keys: Sequence[tuple[str, str, str | None]],
    components: Sequence[str] = ("worker", "processors", "gateway"),
    **overrides: Any,
) -> AsyncIterator[tuple[str, Pipeline]]:
    """A fresh deployment (`pipeline_settings` with `overrides`) whose gateway takes `keys` and
    answers slowly starting models (240 s); yields the gateway's URL and the pipeline once the
    gateway answers /healthz."""
    port = free_port()
    s = await pipeline_settings(
        kafka,
        postgres,
        root,
        **{
            "gateway_port": port,
            "gateway_keys_file": write_keys(root, *keys),
            "gateway_timeout_s": 240.0,
            **overrides,
        },
    )
    url = f"http://127.0.0.1:{port}"
    async with running_pipeline(s, root, list(components), ready=lambda _: gateways_healthy(url)) as p:
        yield url, p
