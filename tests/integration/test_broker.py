"""The local broker is a real Kafka (KRaft) Java process that keeps its data across restarts."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
from aiokafka import TopicPartition

from infra.kafka.broker import LocalKafka
from infra.kafka.clients import make_consumer, make_producer
from infra.kafka.topics import declare_topics
from infra.procs import free_port
from infra.settings import Settings
from tests.conftest import CACHE, KAFKA_VERSION
from tests.provision import broker_auth

AUTH, CLIENT = broker_auth()


@pytest.fixture
def own_broker(tmp_path: Path):
    broker = LocalKafka(
        tmp_path / "broker",
        cache=CACHE,
        version=KAFKA_VERSION,
        port=free_port(),
        controller_port=free_port(),
        auth=AUTH,
    )
    yield broker
    broker.stop()


async def _produce(settings: Settings, topic: str, n: int) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for i in range(n):
            await producer.send(topic, f"m{i}".encode(), key=b"k", partition=0)
        await producer.flush()
    finally:
        await producer.stop()


async def _read_all(settings: Settings, topic: str) -> list[bytes]:
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        out: list[bytes] = []
        while len(out) < end:
            batch = await consumer.getmany(tp, timeout_ms=2000)
            if not batch:
                break
            out.extend(r.value for r in batch[tp])
        return out
    finally:
        await consumer.stop()


async def test_start_stop_restart_keeps_messages(own_broker: LocalKafka, tmp_path: Path) -> None:
    own_broker.start()
    proc = psutil.Process(own_broker.pid)
    assert proc.name() == "java" and "kafka.Kafka" in proc.cmdline()
    s = Settings(
        kafka_bootstrap=own_broker.bootstrap,
        topic_prefix="life",
        kafka_partitions=1,
        _env_file=None,  # type: ignore[call-arg]
        **CLIENT,
    )
    await declare_topics(s, tenants=["default"])
    topic = s.topics.tenant("default").requests("chat")
    await _produce(s, topic, 50)

    own_broker.stop()
    assert not own_broker.running
    own_broker.start()
    assert await _read_all(s, topic) == [f"m{i}".encode() for i in range(50)]

    # A crash (SIGKILL) loses nothing that was acknowledged with acks=all.
    await _produce(s, topic, 10)
    own_broker.kill()
    assert not own_broker.running
    own_broker.start()
    got = await _read_all(s, topic)
    assert len(got) == 60 and got[-1] == b"m9"


async def test_port_taken_is_a_clear_error(own_broker: LocalKafka, kafka) -> None:  # type: ignore[no-untyped-def]
    from infra.procs import ServiceError

    if kafka.local is None:
        pytest.skip("needs the session's local broker to hold a port")
    own_broker.port = kafka.local.port
    with pytest.raises(ServiceError, match=f"port {kafka.local.port} .* is taken"):
        own_broker.start()
