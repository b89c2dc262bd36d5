"""Throwaway services for tests and benchmarks, by one policy:

1. an environment variable names a running service → use it
   (RAGBUS_TEST_KAFKA_BOOTSTRAP, RAGBUS_TEST_PG_DSN, RAGBUS_TEST_MILVUS_URI);
2. else a Docker engine answers → testcontainers;
3. else the project's own local processes (a real Kafka broker, a real Postgres; Milvus Lite, or
   for the tests that need a server, a real Milvus standalone server: `milvus_server_service`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from infra.kafka.broker import BrokerAuth, LocalKafka, ScramUser
from infra.milvus_server import LocalMilvus
from infra.postgres.server import LocalPostgres
from infra.procs import free_port
from schemas.tenants import COMPONENTS_USER, SCRAM_MECHANISM

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
    #: Settings that connect to it as ragbus's components (the local broker is authenticated).
    client: dict[str, Any] = field(default_factory=dict)


@dataclass
class PostgresService:
    dsn: str
    kind: str
    local: LocalPostgres | None = None

    def dsn_for(self, database: str) -> str:
        from urllib.parse import urlsplit, urlunsplit

        return urlunsplit(urlsplit(self.dsn)._replace(path=f"/{database}"))


@dataclass
class MilvusService:
    """A Milvus server (never Milvus Lite): what several processes can share."""

    uri: str
    kind: str  # "env" | "docker" | "local"
    local: LocalMilvus | None = None


def broker_auth(*, tls: bool = False) -> tuple[BrokerAuth, dict[str, Any]]:
    """Authentication for a local broker of a test, as `ragbus up` sets it up (SCRAM-SHA-512 on the
    client listener, ACLs, the components' super user), and the Settings fields of its components."""
    password = secrets.token_urlsafe(24)
    auth = BrokerAuth(
        ScramUser(COMPONENTS_USER, password, SCRAM_MECHANISM), secrets.token_urlsafe(24), tls=tls
    )
    client = {
        "kafka_security_protocol": auth.protocol,
        "kafka_sasl_mechanism": SCRAM_MECHANISM,
        "kafka_sasl_username": COMPONENTS_USER,
        "kafka_sasl_password": SecretStr(password),
    }
    return auth, client


@contextlib.contextmanager
def kafka_service(workdir: Path, *, cache: Path, version: str, secure: bool = True) -> Iterator[KafkaService]:
    """A broker for a test session or a bench; the local one is authenticated unless `secure` is
    false (an open listener, to measure what SASL and ACLs cost)."""
    if os.environ.get(KAFKA_ENV):
        yield KafkaService(os.environ[KAFKA_ENV], "env")
        return
    if docker_available():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.9.0").with_kraft() as container:
            yield KafkaService(container.get_bootstrap_server(), "docker")
        return
    auth, client = broker_auth() if secure else (None, {})
    broker = LocalKafka(
        workdir,
        cache=cache,
        version=version,
        port=free_port(),
        controller_port=free_port(),
        default_partitions=2,
        auth=auth,
    )
    broker.start()
    try:
        yield KafkaService(broker.bootstrap, "local", broker, client)
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


@contextlib.contextmanager
def milvus_server_service(workdir: Path, *, cache: Path, version: str) -> Iterator[MilvusService]:
    """A Milvus server for a test session: RAGBUS_TEST_MILVUS_URI when it names one (http(s)://),
    else a Docker container, else the local standalone server (infra/milvus_server.py) on a fresh
    data folder."""
    uri = os.environ.get(MILVUS_ENV, "")
    if uri.startswith(("http://", "https://", "tcp://")):
        yield MilvusService(uri, "env")
        return
    if docker_available():
        from testcontainers.community.milvus import MilvusContainer

        with MilvusContainer(f"milvusdb/milvus:v{version}") as container:
            yield MilvusService(container.get_connection_url(), "docker")
        return
    server = LocalMilvus(workdir, cache=cache, port=free_port(), version=version)
    server.start()
    try:
        yield MilvusService(server.uri, "local", server)
    finally:
        server.stop()


async def create_database(admin_dsn: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def describe(*services: Any) -> str:
    return ", ".join(f"{type(s).__name__}={getattr(s, 'kind', s)}" for s in services)
