"""The local stack behind `ragbus up/down/status`: a Kafka broker, a Postgres server and a Milvus
Lite file under RAGBUS_HOME, each used only where settings name no external service."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from infra.kafka.broker import LocalKafka, probe
from infra.kafka.topics import Declared, declare_topics
from infra.postgres.server import LocalPostgres
from infra.procs import ServiceError
from infra.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    name: str
    healthy: bool
    where: str
    detail: str = ""
    log: Path | None = None
    managed: bool = True


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        home = settings.home
        self.kafka: LocalKafka | None = (
            LocalKafka(
                home / "broker",
                cache=home,
                version=settings.kafka_version,
                host=settings.kafka_host,
                port=settings.kafka_port,
                controller_port=settings.kafka_controller_port,
                heap=settings.kafka_heap,
            )
            if settings.uses_local_kafka
            else None
        )
        self.postgres: LocalPostgres | None = (
            LocalPostgres(
                home / "postgres",
                port=settings.pg_port,
                host=settings.pg_host,
                user=settings.pg_user,
                database=settings.pg_database,
            )
            if settings.uses_local_postgres
            else None
        )

    # --- lifecycle -------------------------------------------------------------------------
    def up(self) -> Declared:
        """Start what is local, then declare topics and apply migrations on whatever is used."""
        if self.kafka is not None:
            self.kafka.start()
        elif not probe(self.settings.bootstrap) and self.settings.kafka_security_protocol == "PLAINTEXT":
            raise ServiceError(f"no Kafka broker answers at RAGBUS_KAFKA_BOOTSTRAP={self.settings.bootstrap}")
        if self.postgres is not None:
            self.postgres.start()
        if self.settings.uses_milvus_lite:
            Path(self.settings.milvus_target).parent.mkdir(parents=True, exist_ok=True)
        declared = asyncio.run(declare_topics(self.settings))
        asyncio.run(self._migrate())
        return declared

    async def _migrate(self) -> None:
        import asyncpg

        from infra.postgres.migrations import migrate

        conn = await asyncpg.connect(self.settings.postgres_dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    def down(self) -> None:
        if self.kafka is not None:
            self.kafka.stop()
        if self.postgres is not None:
            self.postgres.stop()

    # --- health ----------------------------------------------------------------------------
    def health(self) -> list[ServiceState]:
        s = self.settings
        states = []
        if self.kafka is not None:
            ok = self.kafka.running and _safe(lambda: probe(s.bootstrap))
            detail = f"pid {self.kafka.pid}" if self.kafka.running else "not running"
            states.append(ServiceState("kafka", ok, s.bootstrap, detail, self.kafka.log_path))
        else:
            ok = _safe(lambda: probe(s.bootstrap)) if s.kafka_security_protocol == "PLAINTEXT" else True
            states.append(ServiceState("kafka", ok, s.bootstrap, "external", managed=False))
        if self.postgres is not None:
            running = self.postgres.running
            states.append(
                ServiceState(
                    "postgres",
                    running,
                    self.postgres.dsn,
                    f"pid {self.postgres.pid}" if running else "not running",
                    self.postgres.log_path,
                )
            )
        else:
            ok = _safe(lambda: asyncio.run(_pg_ping(s.postgres_dsn)))
            states.append(ServiceState("postgres", ok, _mask_dsn(s.postgres_dsn), "external", managed=False))
        target = s.milvus_target
        if s.uses_milvus_lite:
            exists = Path(target).exists()
            states.append(
                ServiceState(
                    "milvus", True, target, "Milvus Lite file" + ("" if exists else " (created on first use)")
                )
            )
        else:
            states.append(
                ServiceState("milvus", _safe(lambda: _milvus_ping(s)), target, "external", managed=False)
            )
        return states


def _safe(check: object) -> bool:
    try:
        return bool(check())  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - a failed check means unhealthy
        return False


async def _pg_ping(dsn: str) -> bool:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


def _milvus_ping(settings: Settings) -> bool:
    from infra.milvus import make_milvus_client

    client = make_milvus_client(settings)
    client.list_collections()
    return True


def _mask_dsn(dsn: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":********@")
        return urlunsplit(parts._replace(netloc=netloc))
    return dsn
