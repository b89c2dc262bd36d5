"""A real Apache Kafka broker (KRaft, combined broker+controller) run as a local Java process.

Used by `ragbus up` and by the test fixtures when no cluster is named by RAGBUS_KAFKA_BOOTSTRAP
and no Docker engine answers. Data survives `stop()`/`start()`; `kill()` is a SIGKILL for
crash tests. One node of a multi-node quorum (`infra.kafka.cluster`) is the same class with its
node id, the quorum's voters, a shared cluster id and the replication of the internal topics.

Authenticated with a `BrokerAuth` (what `ragbus up` gives it): SASL/SCRAM on the client listener
and the StandardAuthorizer, so a process that can reach the port but holds no credentials gets no
metadata, and a tenant's principal only what its ACLs allow. Without one (`--insecure`), today's
open PLAINTEXT listener.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import os
import socket
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.helpers import create_ssl_context

from infra.kafka.jars import ensure_jars
from infra.kafka.tls import make_keystore
from infra.procs import OwnedProcess, ServiceError, port_in_use
from infra.secrets import generate_password, read_secret

log = logging.getLogger(__name__)

LOG4J2 = Path(__file__).with_name("log4j2.properties")


@dataclass(frozen=True)
class ScramUser:
    name: str
    password: str
    mechanism: str = "SCRAM-SHA-512"


#: The principal brokers and controllers present to each other on the controller listener
#: (SASL PLAIN with a password only the nodes' own config files hold).
CONTROLLER_USER = "ragbus-controller"


@dataclass
class BrokerAuth:
    """An authenticated broker: the client listener speaks SASL (SCRAM) — over TLS with a
    self-signed certificate when `tls` — and the StandardAuthorizer allows nothing without an ACL.

    `super_user` (created with `kafka-storage format --add-scram`) is the principal ragbus's own
    components use; brokers also use it among themselves on the client listener (inter-broker).
    The controller listener takes SASL PLAIN from `CONTROLLER_USER` only: an anonymous client that
    reaches it gets no principal, let alone a super user's. `users` are further SCRAM users made at
    format time (tests).
    """

    super_user: ScramUser
    controller_password: str
    tls: bool = False
    users: list[ScramUser] = field(default_factory=list)

    @property
    def protocol(self) -> str:
        return "SASL_SSL" if self.tls else "SASL_PLAINTEXT"


class LocalKafka(OwnedProcess):
    def __init__(
        self,
        root: Path,
        *,
        cache: Path,
        version: str,
        host: str = "127.0.0.1",
        port: int = 9092,
        controller_port: int = 9093,
        heap: str = "768m",
        auth: BrokerAuth | None = None,
        tls_dir: Path | None = None,
        default_partitions: int = 1,
        node_id: int = 1,
        voters: str | None = None,
        replication: int = 1,
        cluster_id: str | None = None,
    ) -> None:
        self.root = root
        self.cache = cache
        self.version = version
        self.host = host
        self.port = port
        self.controller_port = controller_port
        self.heap = heap
        #: None: today's open PLAINTEXT listener without an authorizer (`ragbus up --insecure`).
        self.auth = auth
        self._tls_dir = tls_dir
        self.default_partitions = default_partitions
        self.node_id = node_id
        #: `controller.quorum.voters` (id@host:port,...); None: this node alone.
        self.voters = voters
        #: Replication factor of the internal topics (offsets, transaction state) and of topics
        #: created without one; their min.insync.replicas follows from it (`min_insync`).
        self.replication = replication
        #: Formats the storage with this id (all nodes of one quorum share it); None: a new one.
        self.cluster_id = cluster_id
        self.label = f"kafka broker {node_id}"

    # --- layout ----------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def config_path(self) -> Path:
        return self.root / "server.properties"

    @property
    def log_path(self) -> Path:
        return self.root / "broker.log"

    @property
    def pid_path(self) -> Path:
        return self.root / "broker.pid"

    @property
    def tls_dir(self) -> Path:
        """The keystore and CA; a cluster's nodes share one (clients trust one CA)."""
        return self._tls_dir or self.root / "tls"

    @property
    def auth_marker(self) -> Path:
        """Written when the storage is formatted with the components' SCRAM user: a storage
        formatted without it cannot serve an authenticated listener (nobody could log in)."""
        return self.root / "scram-formatted"

    @property
    def listener_path(self) -> Path:
        """The client listener's security protocol of the last start, for clients of the local
        broker that name none (`infra.kafka.clients.client_settings`)."""
        return self.root / "client-listener"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def client_security(self) -> dict[str, Any]:
        """aiokafka options for connecting as the components' super user (readiness probes)."""
        if self.auth is None:
            return {}
        kw: dict[str, Any] = {
            "security_protocol": self.auth.protocol,
            "sasl_mechanism": self.auth.super_user.mechanism,
            "sasl_plain_username": self.auth.super_user.name,
            "sasl_plain_password": self.auth.super_user.password,
        }
        if self.auth.tls:
            kw["ssl_context"] = create_ssl_context(cafile=str(self.ca_file))
        return kw

    # --- configuration ---------------------------------------------------------------------
    def _keystore_password(self) -> str:
        path = self.tls_dir / "password"
        if read_secret(path) is None:
            write_private(path, generate_password())
        return read_secret(path)  # type: ignore[return-value]

    def _properties(self) -> dict[str, str]:
        h = self.host
        rf, isr = str(self.replication), str(min_insync(self.replication))
        client = "PLAINTEXT" if self.auth is None else "CLIENT"
        listeners = [f"{client}://{h}:{self.port}", f"CONTROLLER://{h}:{self.controller_port}"]
        if self.auth is None:
            protocol_map = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        else:
            protocol_map = [f"CLIENT:{self.auth.protocol}", "CONTROLLER:SASL_PLAINTEXT"]
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters or f"{self.node_id}@{h}:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": client,
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self.default_partitions),
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "message.max.bytes": str(64 * 1024 * 1024),
            "replica.fetch.max.bytes": str(64 * 1024 * 1024),
            "socket.request.max.bytes": str(128 * 1024 * 1024),
            "log.retention.check.interval.ms": "60000",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "background.threads": "4",
        }
        if self.replication > 1:
            # A crashed peer is fenced (and its partitions led elsewhere) after 6 s, not 9 s.
            props["broker.heartbeat.interval.ms"] = "1000"
            props["broker.session.timeout.ms"] = "6000"
            # A node's controlled shutdown waits for the active controller's approval, which never
            # comes to the last nodes of a quorum being stopped together (`ragbus down`): they would
            # each sit out the stop timeout. Without it a stopping node's partitions move to the
            # others once its session ends (6 s); its log is flushed and closed cleanly either way.
            props["controlled.shutdown.enable"] = "false"
        if self.auth is not None:
            props.update(self._auth_properties(self.auth))
        props["listeners"] = ",".join(listeners)
        props["advertised.listeners"] = ",".join(x for x in listeners if not x.startswith("CONTROLLER"))
        props["listener.security.protocol.map"] = ",".join(protocol_map)
        return props

    def _auth_properties(self, auth: BrokerAuth) -> dict[str, str]:
        """SCRAM on the client listener (also inter-broker), PLAIN on the controller listener,
        and the KRaft StandardAuthorizer denying whatever no ACL allows."""
        su, cpw = auth.super_user, auth.controller_password
        mechanisms = sorted({su.mechanism, *(u.mechanism for u in auth.users)})
        props = {
            "sasl.enabled.mechanisms": ",".join(mechanisms),
            "sasl.mechanism.inter.broker.protocol": su.mechanism,
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "sasl.mechanism.controller.protocol": "PLAIN",
            # Server side: the one user it accepts; client side (broker → controller): who it is.
            "listener.name.controller.plain.sasl.jaas.config": (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="{CONTROLLER_USER}" password="{cpw}" user_{CONTROLLER_USER}="{cpw}";'
            ),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": f"User:{su.name};User:{CONTROLLER_USER}",
        }
        for mech in mechanisms:
            # The credentials are those a broker logs in with to its peers (inter-broker); the
            # server side checks clients against the SCRAM credentials in the metadata log.
            props[f"listener.name.client.{mech.lower()}.sasl.jaas.config"] = (
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{su.name}" password="{su.password}";'
            )
        if auth.tls:
            pw = self._keystore_password()
            props.update(
                {
                    "ssl.keystore.type": "PKCS12",
                    "ssl.keystore.location": str(self.tls_dir / "broker.p12"),
                    "ssl.keystore.password": pw,
                    "ssl.key.password": pw,
                    "ssl.client.auth": "none",
                    # Brokers talk to each other on this listener too: they trust the one CA.
                    "ssl.truststore.type": "PEM",
                    "ssl.truststore.location": str(self.ca_file),
                }
            )
        return props

    def _write_config(self) -> None:
        """server.properties holds the passwords of the listeners: 0600 in a 0700 folder."""
        text = "".join(f"{k}={v}\n" for k, v in self._properties().items())
        write_private(self.config_path, "# written by ragbus; edits are overwritten at start\n" + text)

    def _java(self, libs: Path, main: str, *args: str, heap: str = "256m") -> list[str]:
        return [
            "java",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J2}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    @property
    def formatted(self) -> bool:
        return (self.data_dir / "meta.properties").exists()

    def prepare(self) -> Path:
        """Resolve jars, write the config and format KRaft storage on first use."""
        libs = ensure_jars(self.cache, self.version)
        if self.auth is not None and self.auth.tls and not (self.tls_dir / "broker.p12").exists():
            make_keystore(self.tls_dir, self._keystore_password(), self.host)
        if self.auth is not None and self.formatted and not self.auth_marker.exists():
            raise ServiceError(
                f"the local Kafka storage under {self.root} was formatted without authentication, so "
                "no user could log in to an authenticated listener; start it with `ragbus up "
                "--insecure` (RAGBUS_INSECURE=1), or remove that folder (its data is lost) to start "
                "it secure"
            )
        self._write_config()
        if not self.formatted:
            cluster_id = self.cluster_id or new_cluster_id()
            args = ["format", f"--cluster-id={cluster_id}", "-c", str(self.config_path)]
            users = [self.auth.super_user, *self.auth.users] if self.auth else []
            for user in users:
                args += ["--add-scram", f"{user.mechanism}=[name={user.name},password={user.password}]"]
            out = subprocess.run(
                self._java(libs, "kafka.tools.StorageTool", *args),
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                fmt_log = self.root / "format.log"
                fmt_log.write_text(out.stdout + out.stderr)
                raise ServiceError("formatting the KRaft storage failed", fmt_log)
            if self.auth is not None:
                self.auth_marker.write_text(f"{self.auth.super_user.name}\n")
        self.listener_path.write_text((self.auth.protocol if self.auth else "PLAINTEXT") + "\n")
        return libs

    # --- lifecycle -------------------------------------------------------------------------
    def check_ports(self) -> None:
        """Raise a clear error when a port this node listens on is taken by another process."""
        for port in (self.port, self.controller_port):
            if port_in_use(port, self.host):
                raise ServiceError(
                    f"port {port} on {self.host} is taken by another process; free it or set "
                    "RAGBUS_KAFKA_PORT / RAGBUS_KAFKA_CONTROLLER_PORT"
                )

    def start(self, *, wait: bool = True, timeout: float = 120.0) -> int:
        if self.running:
            if wait:
                self.wait_ready(timeout)
            return self.pid  # type: ignore[return-value]
        self.check_ports()
        libs = self.prepare()
        env = dict(os.environ, KAFKA_HEAP_OPTS=f"-Xmx{self.heap}")
        proc = self._spawn(self._java(libs, "kafka.Kafka", str(self.config_path), heap=self.heap), env=env)
        log.info("kafka broker starting (pid %d) on %s, log %s", proc.pid, self.bootstrap, self.log_path)
        if wait:
            self.wait_ready(timeout)
        return proc.pid

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the broker answers a metadata request listing live brokers."""
        self._wait_until(
            lambda: probe(self.bootstrap, timeout=5.0, **self.client_security()),
            timeout,
            interval=0.3,
            exited="the Kafka broker exited during start-up",
            timed_out=f"the Kafka broker did not become ready in {timeout:.0f} s",
        )

    def restart(self, timeout: float = 120.0) -> None:
        self.stop()
        self.start(timeout=timeout)


async def _live_brokers(bootstrap: str, timeout: float, security: dict[str, Any]) -> set[int]:
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000), **security)
    try:
        await asyncio.wait_for(client.bootstrap(), timeout)
        metadata = await asyncio.wait_for(client.fetch_all_metadata(), timeout)
        return {b.nodeId for b in metadata.brokers()}
    finally:
        await client.close()


def write_private(path: Path, text: str) -> None:
    """Write `path` as 0600 (atomically) in a folder made 0700: config files and keys that hold
    passwords. Only that folder is tightened, never its parents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def min_insync(replication: int) -> int:
    """min.insync.replicas for a replication factor: 2 from 3 replicas on (an acks=all write
    survives the loss of any one broker, and one broker may be down without stopping writes);
    below 3, 1 (a second required replica would stop every write while one broker is down)."""
    return 2 if replication >= 3 else 1


def new_cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


_probe_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-probe")


def _open_addresses(bootstrap: str, timeout: float) -> list[str]:
    """The bootstrap addresses that accept a connection (one broker of a cluster may be down while
    the others serve; asking only these keeps the client from logging refused connections)."""
    found = []
    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                found.append(address.strip())
        except OSError:
            continue
    return found


def probe(bootstrap: str, timeout: float = 5.0, **security: Any) -> bool:
    """True when a broker at `bootstrap` answers metadata; callable from sync and async code.
    `security`: aiokafka's security options (an authenticated broker answers only with them)."""
    return bool(probe_brokers(bootstrap, timeout, **security))


def probe_brokers(bootstrap: str, timeout: float = 5.0, **security: Any) -> set[int]:
    """The ids of the live brokers the cluster at `bootstrap` lists in its metadata (a KRaft
    cluster lists only registered, unfenced brokers); empty when nothing answers."""
    reachable = _open_addresses(bootstrap, timeout)
    if not reachable:
        return set()
    return _probe_pool.submit(asyncio.run, _live_brokers(",".join(reachable), timeout, security)).result(
        timeout + 5
    )
