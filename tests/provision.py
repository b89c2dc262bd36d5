"""Throwaway services for tests and benchmarks, by one policy:

1. an environment variable names a running service → use it
   (RAGBUS_TEST_KAFKA_BOOTSTRAP, RAGBUS_TEST_PG_DSN, RAGBUS_TEST_MILVUS_URI);
2. else a Docker engine answers → testcontainers;
3. else the project's own local processes (a real Kafka broker, a real Postgres; Milvus Lite).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.kafka.broker import LocalKafka
from infra.postgres.server import LocalPostgres
from infra.procs import free_port

log = logging.getLogger(__name__)

KAFKA_ENV = "RAGBUS_TEST_KAFKA_BOOTSTRAP"
PG_ENV = "RAGBUS_TEST_PG_DSN"
MILVUS_ENV = "RAGBUS_TEST_MILVUS_URI"


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return (
            subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class KafkaService:
    bootstrap: str
    kind: str  # "env" | "docker" | "local"
    local: LocalKafka | None = None


@dataclass
class PostgresService:
    dsn: str
    kind: str
    local: LocalPostgres | None = None

    def dsn_for(self, database: str) -> str:
        from urllib.parse import urlsplit, urlunsplit

        return urlunsplit(urlsplit(self.dsn)._replace(path=f"/{database}"))


@contextlib.contextmanager
def kafka_service(workdir: Path, *, cache: Path, version: str) -> Iterator[KafkaService]:
    if os.environ.get(KAFKA_ENV):
        yield KafkaService(os.environ[KAFKA_ENV], "env")
        return
    if docker_available():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.9.0").with_kraft() as container:
            yield KafkaService(container.get_bootstrap_server(), "docker")
        return
    broker = LocalKafka(
        workdir,
        cache=cache,
        version=version,
        port=free_port(),
        controller_port=free_port(),
        default_partitions=2,
    )
    broker.start()
    try:
        yield KafkaService(broker.bootstrap, "local", broker)
    finally:
        broker.stop()


@contextlib.contextmanager
def postgres_service(workdir: Path) -> Iterator[PostgresService]:
    if os.environ.get(PG_ENV):
        yield PostgresService(os.environ[PG_ENV], "env")
        return
    if docker_available():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer("postgres:17", driver=None) as container:
            yield PostgresService(container.get_connection_url(), "docker")
        return
    server = LocalPostgres(workdir, port=free_port(), database="postgres")
    server.start()
    try:
        yield PostgresService(server.owner_dsn(), "local", server)
    finally:
        server.stop()


@contextlib.contextmanager
def milvus_service(workdir: Path) -> Iterator[str]:
    """A Milvus URI. Tests give each collection a unique name; with Lite, one file per process."""
    if os.environ.get(MILVUS_ENV):
        yield os.environ[MILVUS_ENV]
        return
    workdir.mkdir(parents=True, exist_ok=True)
    yield str(workdir / "milvus.db")


async def create_database(admin_dsn: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def describe(*services: Any) -> str:
    return ", ".join(f"{type(s).__name__}={getattr(s, 'kind', s)}" for s in services)
