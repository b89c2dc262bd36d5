"""How a local cluster is laid out: node ports, the bootstrap list clients get, and the
min.insync.replicas that follows from a replication factor."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.kafka.broker import min_insync
from infra.kafka.cluster import LocalKafkaCluster, node_ports
from infra.procs import ServiceError
from infra.settings import Settings


def test_nodes_listen_two_ports_apart_and_clients_bootstrap_from_all() -> None:
    assert node_ports(9092, 9093, 3) == [(9092, 9093), (9094, 9095), (9096, 9097)]
    s = Settings(kafka_brokers=3, _env_file=None)  # type: ignore[call-arg]
    assert s.bootstrap == "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"
    assert Settings(_env_file=None).bootstrap == "127.0.0.1:9092"  # type: ignore[call-arg]


def test_min_insync_leaves_room_for_one_broker_down() -> None:
    assert [min_insync(rf) for rf in (1, 2, 3, 5)] == [1, 1, 2, 2]


def test_quorum_voters_and_internal_replication(tmp_path: Path) -> None:
    cluster = LocalKafkaCluster(
        tmp_path, cache=tmp_path, version="4.1.1", brokers=3, port=19092, controller_port=19093
    )
    props = cluster.node(2)._properties()  # noqa: SLF001 - the config is what this checks
    assert props["node.id"] == "2"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"
    assert props["transaction.state.log.replication.factor"] == "3"
    assert props["transaction.state.log.min.isr"] == "2"
    assert props["offsets.topic.replication.factor"] == "3"
    assert cluster.bootstrap == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"


def test_overlapping_ports_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="distinct ports"):
        LocalKafkaCluster(
            tmp_path, cache=tmp_path, version="4.1.1", brokers=3, port=9092, controller_port=9094
        )
