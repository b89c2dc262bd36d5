"""A local multi-node Kafka cluster: N KRaft nodes on this machine, each a combined broker and
controller, all of them voters of one controller quorum.

Why three Java processes and not one: replication, leader election, ISR shrink and recovery, and a
producer's acks=all wait on other brokers are what a deployment on a real cluster depends on, and
they only happen between separate brokers. `ragbus up --brokers 3` and the cluster tests run it.

Layout under `root`: `node-<i>/` per node (its own config, data, log and pid file), `cluster.id`
(all nodes are formatted with it) and `brokers` (how many nodes the storage was formatted for: the
voter set is fixed at that point, so a later start with another count is refused).
Node i listens on `port + 2(i-1)` (clients) and `controller_port + 2(i-1)` (the quorum).
Authenticated like one broker (`infra.kafka.broker.BrokerAuth`): brokers replicate as the
components' SCRAM super user, and the quorum speaks SASL PLAIN with a password of its own.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from pathlib import Path

from infra.kafka.broker import BrokerAuth, LocalKafka, new_cluster_id, probe, probe_brokers
from infra.procs import ServiceError

log = logging.getLogger(__name__)

#: Heap per node of a local cluster: three nodes share a small machine (2 cores, 24 GiB here).
CLUSTER_HEAP = "512m"


def node_ports(port: int, controller_port: int, brokers: int) -> list[tuple[int, int]]:
    """(client port, controller port) of each node, by the documented layout."""
    return [(port + 2 * i, controller_port + 2 * i) for i in range(brokers)]


class LocalKafkaCluster:
    def __init__(
        self,
        root: Path,
        *,
        cache: Path,
        version: str,
        brokers: int = 3,
        host: str = "127.0.0.1",
        port: int = 9092,
        controller_port: int = 9093,
        ports: list[tuple[int, int]] | None = None,
        heap: str = CLUSTER_HEAP,
        default_partitions: int = 1,
        auth: BrokerAuth | None = None,
    ) -> None:
        if brokers < 2:
            raise ValueError("a local cluster has 2 or more brokers; one broker is LocalKafka")
        ports = ports or node_ports(port, controller_port, brokers)
        flat = [p for pair in ports for p in pair]
        if len(ports) != brokers or len(set(flat)) != len(flat):
            raise ServiceError(
                f"the {brokers} nodes need {2 * brokers} distinct ports, got {ports}; set "
                "RAGBUS_KAFKA_PORT and RAGBUS_KAFKA_CONTROLLER_PORT at least "
                f"{2 * brokers} apart (node i uses port + 2(i-1))"
            )
        self.root = root
        self.brokers = brokers
        self.host = host
        replication = min(3, brokers)
        voters = ",".join(f"{i + 1}@{host}:{cport}" for i, (_, cport) in enumerate(ports))
        self.nodes = [
            LocalKafka(
                root / f"node-{i + 1}",
                cache=cache,
                version=version,
                host=host,
                port=bport,
                controller_port=cport,
                heap=heap,
                default_partitions=default_partitions,
                node_id=i + 1,
                voters=voters,
                replication=replication,
                # Every node the same users and controller password; with TLS one keystore, so
                # clients trust one CA.
                auth=auth,
                tls_dir=root / "tls",
            )
            for i, (bport, cport) in enumerate(ports)
        ]

    # --- layout ----------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    @property
    def running(self) -> bool:
        """Whether any node runs (a cluster with one node down is still up, and still needs `down`)."""
        return any(n.running for n in self.nodes)

    @property
    def log_path(self) -> Path:
        return self.nodes[0].log_path

    @property
    def ca_file(self) -> Path:
        return self.nodes[0].ca_file

    def node(self, node_id: int) -> LocalKafka:
        return self.nodes[node_id - 1]

    @staticmethod
    def formatted_brokers(root: Path) -> int | None:
        """How many nodes the cluster under `root` was formatted for (None: not formatted)."""
        try:
            return int((root / "brokers").read_text().strip())
        except (OSError, ValueError):
            return None

    def _cluster_id(self) -> str:
        """The id every node is formatted with; refuses a node count other than the formatted one."""
        formatted = self.formatted_brokers(self.root)
        if formatted is not None and formatted != self.brokers:
            raise ServiceError(
                f"the local Kafka cluster under {self.root} was formatted for {formatted} brokers and "
                f"its quorum cannot change size; start it with --brokers {formatted}, or remove that "
                "folder (its data is lost) to start another size"
            )
        path = self.root / "cluster.id"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            path.write_text(new_cluster_id() + "\n")
            (self.root / "brokers").write_text(f"{self.brokers}\n")
        return path.read_text().strip()

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, *, wait: bool = True, timeout: float = 180.0) -> None:
        """Start every node that is not running (all at once: a node waits for a quorum of voters
        before it serves), then wait until the metadata lists every broker."""
        cluster_id = self._cluster_id()
        stopped = [n for n in self.nodes if not n.running]
        for node in stopped:
            node.check_ports()
            node.cluster_id = cluster_id
        # Formatting each node's storage is a JVM run of its own: side by side, not one after another.
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(stopped) or 1) as pool:
            list(pool.map(lambda n: n.start(wait=False), stopped))
        if wait:
            self.wait_ready(timeout)

    def start_node(self, node_id: int, *, timeout: float = 120.0) -> None:
        """Start one node again (after `kill_node` or `stop_node`) and wait until it is a live broker."""
        node = self.node(node_id)
        node.cluster_id = self._cluster_id()
        node.start(wait=False)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Block until every node runs, the cluster's metadata lists all of them as brokers, and
        each answers on its own client listener (a broker is listed once the controller unfences
        it, which can be a moment before its listener accepts connections)."""
        deadline = time.monotonic() + timeout
        live: set[int] = set()
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.running:
                    raise ServiceError(
                        f"Kafka node {node.node_id} exited during start-up; see its log", node.log_path
                    )
            try:
                live = probe_brokers(self.bootstrap, timeout=5.0, **self.nodes[0].client_security())
            except Exception:  # noqa: BLE001 - not answering yet is an answer here
                live = set()
            if live >= {n.node_id for n in self.nodes} and all(_answers(n) for n in self.nodes):
                return
            time.sleep(0.3)
        missing = sorted({n.node_id for n in self.nodes} - live)
        raise ServiceError(
            f"the local Kafka cluster did not list brokers {missing} as live in {timeout:.0f} s",
            self.node(missing[0]).log_path if missing else self.log_path,
        )

    def stop(self, timeout: float = 60.0) -> None:
        """Stop every node at once. One by one, the last nodes would wait for a quorum that the
        first ones took away and each run into the SIGKILL timeout."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            list(pool.map(lambda n: n.stop(timeout), self.nodes))

    def kill_node(self, node_id: int) -> None:
        """SIGKILL one node, as a crash would."""
        self.node(node_id).kill()

    def stop_node(self, node_id: int, timeout: float = 60.0) -> None:
        self.node(node_id).stop(timeout)


def _answers(node: LocalKafka) -> bool:
    """Whether `node` itself answers a metadata request on its client listener."""
    try:
        return probe(node.bootstrap, timeout=5.0, **node.client_security())
    except Exception:  # noqa: BLE001 - not answering yet is an answer here
        return False
