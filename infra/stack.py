"""The local stack behind `ragbus up/down/status`: a Kafka broker (or a local KRaft cluster of
several, `ragbus up --brokers 3`), a Postgres server and a Milvus Lite file under RAGBUS_HOME, each
used only where settings name no external service.

One broker lives in `<home>/broker`, a cluster in `<home>/kafka-cluster` (`infra.kafka.cluster`):
separate storage, because a KRaft node's storage is formatted for one voter set. Commands that do
not say how many brokers (`status`, `down`, ...) find a running local cluster by itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from infra.kafka.broker import BrokerAuth, LocalKafka, ScramUser, probe, write_private
from infra.kafka.clients import LOCAL_BROKER_DIR, LOCAL_CLUSTER_DIR, client_settings, security_kwargs
from infra.kafka.cluster import CLUSTER_HEAP, LocalKafkaCluster
from infra.kafka.topics import Declared, declare_topics
from infra.postgres.server import LocalPostgres
from infra.procs import ServiceError
from infra.secrets import (
    components_password_path,
    generate_password,
    postgres_password_path,
    read_secret,
    write_secret,
)
from infra.settings import Settings
from schemas.tenants import COMPONENTS_USER, SCRAM_MECHANISM

log = logging.getLogger(__name__)


@dataclass
class ServiceState:
    name: str
    healthy: bool
    where: str
    detail: str = ""
    log: Path | None = None
    managed: bool = True


CLUSTER_DIR = LOCAL_CLUSTER_DIR
#: The tenant `ragbus up` creates, so that `ragbus chat` works out of the box.
DEFAULT_TENANT = "default"


def broker_auth(settings: Settings, root: Path) -> BrokerAuth | None:
    """How the local Kafka under `root` authenticates; None with `insecure`. The components'
    password is generated once per home (0600, never printed); the controller listener's once per
    broker folder."""
    if settings.insecure:
        return None
    path = components_password_path(settings)
    if read_secret(path) is None:
        write_secret(path, generate_password())
    controller = root / "controller.password"
    if read_secret(controller) is None:
        write_private(controller, generate_password())
    return BrokerAuth(
        super_user=ScramUser(COMPONENTS_USER, read_secret(path) or "", SCRAM_MECHANISM),
        controller_password=read_secret(controller) or "",
        tls=settings.kafka_local_tls,
    )


def _single(settings: Settings, *, auth: bool = True) -> LocalKafka:
    root = settings.home / LOCAL_BROKER_DIR
    return LocalKafka(
        root,
        cache=settings.home,
        version=settings.kafka_version,
        host=settings.kafka_host,
        port=settings.kafka_port,
        controller_port=settings.kafka_controller_port,
        heap=settings.kafka_heap,
        auth=broker_auth(settings, root) if auth else None,
    )


def _cluster(settings: Settings, brokers: int, *, auth: bool = True) -> LocalKafkaCluster:
    root = settings.home / CLUSTER_DIR
    return LocalKafkaCluster(
        root,
        cache=settings.home,
        version=settings.kafka_version,
        brokers=brokers,
        host=settings.kafka_host,
        port=settings.kafka_port,
        controller_port=settings.kafka_controller_port,
        # Three JVMs share the machine: a smaller heap each unless one was set.
        heap=settings.kafka_heap if "kafka_heap" in settings.model_fields_set else CLUSTER_HEAP,
        auth=broker_auth(settings, root) if auth else None,
    )


def local_brokers(settings: Settings, brokers: int | None = None) -> int:
    """How many local brokers this command is about: the number asked for, else the setting, else
    the size of a local cluster that is running (so `ragbus status` and `down` find it)."""
    if brokers is not None:
        return brokers
    if settings.kafka_brokers > 1:
        return settings.kafka_brokers
    formatted = LocalKafkaCluster.formatted_brokers(settings.home / CLUSTER_DIR)
    if formatted and formatted > 1 and _cluster(settings, formatted, auth=False).running:
        return formatted
    return 1


class Stack:
    def __init__(self, settings: Settings, *, brokers: int | None = None) -> None:
        if brokers is not None and brokers < 1:
            raise ServiceError(f"--brokers must be 1 or more, got {brokers}")
        self.kafka: LocalKafka | LocalKafkaCluster | None = None
        #: The `default` tenant's credentials when `up` created them (stored 0600, not printed).
        self.default_tenant_created = False
        if settings.uses_local_kafka:
            n = local_brokers(settings, brokers)
            # Clients bootstrap from every local node (Settings.bootstrap), so one down is no matter.
            settings = settings.model_copy(update={"kafka_brokers": n})
            self.kafka = _single(settings) if n == 1 else _cluster(settings, n)
        self.settings = settings
        home = settings.home
        self.postgres: LocalPostgres | None = (
            LocalPostgres(
                home / "postgres",
                port=settings.pg_port,
                host=settings.pg_host,
                user=settings.pg_user,
                database=settings.pg_database,
                password_file=postgres_password_path(settings, settings.pg_user),
            )
            if settings.uses_local_postgres
            else None
        )

    # --- lifecycle -------------------------------------------------------------------------
    def up(self) -> Declared:
        """Start what is local, then declare topics and apply migrations on whatever is used."""
        if self.kafka is not None:
            other = self._other_kafka()
            if other is not None and other.running:
                raise ServiceError(
                    f"a local Kafka {'cluster' if isinstance(other, LocalKafkaCluster) else 'broker'} "
                    f"from an earlier `ragbus up` runs under {other.root}; stop it with `ragbus down`, "
                    "then run `ragbus up` again"
                )
            self.kafka.start()
        elif (
            self.settings.kafka_security_protocol == "PLAINTEXT"
            and not probe(self.settings.bootstrap)  # (a secured remote cluster answers only its clients)
        ):
            raise ServiceError(f"no Kafka broker answers at RAGBUS_KAFKA_BOOTSTRAP={self.settings.bootstrap}")
        if self.postgres is not None:
            self.postgres.start()
        if self.settings.uses_milvus_lite:
            Path(self.settings.milvus_target).parent.mkdir(parents=True, exist_ok=True)
        declared = asyncio.run(declare_topics(self.settings, tenants=[DEFAULT_TENANT]))
        asyncio.run(self._default_tenant())
        asyncio.run(self._migrate())
        return declared

    async def _default_tenant(self) -> None:
        """Credentials for the `default` tenant on the local broker (on an external cluster its
        operator makes principals: `ragbus tenants add`, with a principal allowed to)."""
        from infra.kafka.security import ensure_tenant

        if self.kafka is None:
            return
        created = await ensure_tenant(self.settings, DEFAULT_TENANT, declare=False)
        self.default_tenant_created = created is not None

    async def _migrate(self) -> None:
        import asyncpg

        from infra.postgres.migrations import migrate
        from infra.postgres.roles import ensure_login_roles

        conn = await asyncpg.connect(self.settings.postgres_dsn)
        try:
            await migrate(conn)
            if self.postgres is not None:
                # The local server's sink and reader roles log in with passwords kept under the home;
                # an external server's administrator sets theirs (pg_sink_dsn, pg_reader_dsn).
                await ensure_login_roles(conn, self.settings)
        finally:
            await conn.close()

    def _other_kafka(self) -> LocalKafka | LocalKafkaCluster | None:
        """The local Kafka of the other layout (the cluster when this is one broker, and back)."""
        if isinstance(self.kafka, LocalKafkaCluster):
            return _single(self.settings, auth=False)
        formatted = LocalKafkaCluster.formatted_brokers(self.settings.home / CLUSTER_DIR)
        return _cluster(self.settings, formatted, auth=False) if formatted and formatted > 1 else None

    def expected_brokers(self) -> dict[int, str] | None:
        """Node id → address of the local brokers (None for an external cluster)."""
        if isinstance(self.kafka, LocalKafkaCluster):
            return {n.node_id: n.bootstrap for n in self.kafka.nodes}
        if isinstance(self.kafka, LocalKafka):
            return {self.kafka.node_id: self.kafka.bootstrap}
        return None

    def down(self) -> None:
        """Stop what `ragbus up` started: the local Kafka of either layout, and Postgres."""
        if self.kafka is not None:
            self.kafka.stop()
            other = self._other_kafka()
            if other is not None and other.running:
                other.stop()
        if self.postgres is not None:
            self.postgres.stop()

    # --- health ----------------------------------------------------------------------------
    def security(self) -> str:
        """One line on how the bus is protected, for `ragbus up` and `ragbus status`."""
        s = self.settings
        try:
            effective = client_settings(s)
        except ServiceError:
            effective = s.model_copy(update={"kafka_security_protocol": "SASL_PLAINTEXT"})
        protocol = effective.kafka_security_protocol
        if protocol == "PLAINTEXT":
            return (
                "INSECURE: open listener (PLAINTEXT, no authorizer): any process that reaches "
                f"{s.bootstrap} may read and write every topic"
            )
        if self.kafka is None:
            mech = f" ({effective.kafka_sasl_mechanism})" if protocol.startswith("SASL") else ""
            return f"security: {protocol}{mech} as configured for the external cluster"
        tls = ", TLS" if protocol == "SASL_SSL" else " (no TLS: set RAGBUS_KAFKA_LOCAL_TLS=1 to encrypt)"
        return f"security: SASL/{SCRAM_MECHANISM} + ACLs{tls}"

    def health(self) -> list[ServiceState]:
        s = self.settings
        states = []

        def kafka_probe() -> bool:
            return probe(s.bootstrap, **security_kwargs(s))

        if isinstance(self.kafka, LocalKafkaCluster):
            # Healthy while it serves: with one node of three down it still does (status lists
            # which broker is down and which partitions are short of replicas).
            ok = self.kafka.running and _safe(kafka_probe)
            detail = "; ".join(
                f"node {n.node_id} " + (f"pid {n.pid}" if n.running else "not running")
                for n in self.kafka.nodes
            )
            states.append(ServiceState("kafka", ok, s.bootstrap, detail, self.kafka.log_path))
        elif self.kafka is not None:
            ok = self.kafka.running and _safe(kafka_probe)
            detail = f"pid {self.kafka.pid}" if self.kafka.running else "not running"
            states.append(ServiceState("kafka", ok, s.bootstrap, detail, self.kafka.log_path))
        else:
            ok = _safe(kafka_probe)
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
