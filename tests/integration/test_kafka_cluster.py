"""A 3-broker KRaft cluster (three Java processes, the code `ragbus up --brokers 3` runs): topics
replicated 3 times with min.insync.replicas 2, and transactional request→answer processing that
goes on while one broker is SIGKILLed and restarted: every request answered exactly once for a
read_committed reader, and no partition short of replicas once the broker is back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import CoordinationType
from aiokafka.errors import KafkaError

from infra.kafka.clients import make_admin, make_consumer, make_producer, transactional_id
from infra.kafka.cluster import LocalKafkaCluster
from infra.kafka.codec import Output, decode_record, encode
from infra.kafka.inspect import active_controller, cluster_view
from infra.kafka.publisher import PublishError, TransactionalPublisher
from infra.procs import free_port
from infra.settings import Settings
from schemas import ChatRequest, ChatResponse
from tests.conftest import CACHE, KAFKA_VERSION, unique
from tests.helpers import read_events, spawn, wait_for
from tests.integration.audit_support import audit_coords, readable_records
from tests.integration.pipeline_support import Pipeline, pipeline_settings, running_pipeline
from tests.provision import KafkaService, PostgresService, broker_auth

#: Authenticated like `ragbus up --brokers 3`: brokers replicate as the components' SCRAM user.
AUTH, CLIENT = broker_auth()

log = logging.getLogger(__name__)

pytestmark = pytest.mark.slow

#: A tenant with no documents (short prompts: the bulk job's answers take seconds).
NODOCS = "nodocs"

#: Requests produced before the kill, while the broker is down, and while it restarts.
PHASE = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafkaCluster]:
    """Always a local cluster of our own (never RAGBUS_TEST_KAFKA_BOOTSTRAP): the test kills a broker."""
    ports = [(free_port(), free_port()) for _ in range(3)]
    cluster = LocalKafkaCluster(
        tmp_path_factory.mktemp("kafka-cluster"),
        cache=CACHE,
        version=KAFKA_VERSION,
        brokers=3,
        ports=ports,
        auth=AUTH,
    )
    cluster.start(timeout=180)
    try:
        yield cluster
    finally:
        cluster.stop()


def _settings(cluster: LocalKafkaCluster, tmp_path: Path) -> Settings:
    return Settings(
        kafka_bootstrap=cluster.bootstrap,
        topic_prefix=unique("kc"),
        kafka_partitions=3,
        home=tmp_path / "home",
        _env_file=None,  # type: ignore[call-arg]
        **CLIENT,
    )


async def _echo(settings: Settings, stop: asyncio.Event, restarts: list[str]) -> None:
    """A consuming component in miniature, run the way components are run: requests answered
    through TransactionalPublisher (answers and offsets in one transaction). When its publisher
    fails (the broker gone past retries) this incarnation ends and a new one with the same
    transactional id fences it and resumes from the committed offsets, as a restarted process would."""
    requests, responses = (
        settings.topics.tenant("default").requests("chat"),
        settings.topics.tenant("default").responses("chat"),
    )
    group = f"{settings.topic_prefix}.echo"
    while not stop.is_set():
        publisher = TransactionalPublisher(
            settings, group_id=group, transactional_id=transactional_id(settings, "echo"), client_id="echo"
        )
        consumer = make_consumer(settings, requests, group_id=group, fetch_max_wait_ms=100)
        try:
            await publisher.start()
            await consumer.start()
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=300, max_records=40)
                pairs: list[tuple[Any, list[Output]]] = []
                for records in batch.values():
                    for record in records:
                        event = decode_record(record, ChatRequest, max_bytes=1 << 20)
                        answer = ChatResponse(answer=f"echo {event.question}", **event.envelope())  # type: ignore[arg-type]
                        pairs.append((record, [(responses, encode(answer))]))
                if pairs:
                    await asyncio.wait_for(publisher.submit(pairs), 90)
        except (PublishError, KafkaError, TimeoutError) as e:
            restarts.append(repr(e))
            log.warning("echo incarnation failed (%r); starting a new one", e)
            await asyncio.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 30)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publisher.stop(), 30)


async def _produce(settings: Settings, start: int, n: int) -> None:
    """Requests r<start>..r<start+n-1> through an idempotent acks=all producer (each acknowledged)."""
    producer = make_producer(settings)
    await producer.start()
    try:
        for i in range(start, start + n):
            enc = encode(ChatRequest(question=f"q{i}", tenant_id="acme", request_id=f"r{i}"))
            await producer.send(
                settings.topics.tenant("default").requests("chat"),
                enc.value,
                key=enc.key,
                headers=enc.headers,
            )
        await asyncio.wait_for(producer.flush(), 60)
    finally:
        await producer.stop()


async def _answered(settings: Settings) -> Counter[str]:
    """Answers per request id, as a read_committed reader sees the responses topic."""
    answers = await read_events(
        settings, settings.topics.tenant("default").responses("chat"), ChatResponse, timeout=20
    )
    return Counter(a.request_id for a in answers)


async def test_declared_topics_are_replicated_three_times(cluster: LocalKafkaCluster, tmp_path: Path) -> None:
    s = _settings(cluster, tmp_path)
    from infra.kafka.topics import declare_topics

    declared = await declare_topics(s, tenants=["default"])
    assert declared.replication_factor == 3 and declared.created
    admin = make_admin(s)
    await admin.start()
    try:
        assert await active_controller(admin) in (1, 2, 3)  # what `ragbus status` shows
        described = await admin.describe_topics(s.topics.all() + s.topics.tenant("default").all())
        assert all(len(p["replicas"]) == 3 for t in described for p in t["partitions"])
        name = s.topics.tenant("default").requests("chat")
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        values = {entry[0]: entry[1] for entry in configs[0].resources[0][4]}
        assert values["min.insync.replicas"] == "2"
        # Kafka's own topics for group offsets and transactions are replicated 3 times too.
        internal = await admin.describe_topics(["__transaction_state", "__consumer_offsets"])
        present = [t for t in internal if t["error_code"] == 0]
        assert all(len(p["replicas"]) == 3 for t in present for p in t["partitions"])
    finally:
        await admin.close()


async def test_exactly_once_through_a_broker_crash(cluster: LocalKafkaCluster, tmp_path: Path) -> None:
    from infra.kafka.topics import declare_topics

    s = _settings(cluster, tmp_path)
    await declare_topics(s, tenants=["default"])
    stop, restarts = asyncio.Event(), []
    echo = asyncio.create_task(_echo(s, stop, restarts))
    try:
        # 1. All brokers up.
        await _produce(s, 0, PHASE)
        await wait_for(
            lambda: _count_at_least(s, PHASE),
            timeout=60,
            interval=1.0,
            what=f"{PHASE} answers with 3 brokers up",
        )

        # 2. SIGKILL the echo's transaction coordinator (the broker leading its transaction state,
        # which must move with a transaction open or about to be); work goes on with two brokers.
        admin = make_admin(s)
        await admin.start()
        try:
            victim = await admin._client.coordinator_lookup(  # noqa: SLF001 - no public lookup
                CoordinationType.TRANSACTION, transactional_id(s, "echo")
            )
        finally:
            await admin.close()
        assert victim in (1, 2, 3), f"no transaction coordinator found ({victim!r})"
        cluster.kill_node(victim)
        assert not cluster.node(victim).running
        await asyncio.wait_for(_produce(s, PHASE, PHASE), 90)
        await wait_for(
            lambda: _count_at_least(s, 2 * PHASE),
            timeout=90,
            interval=1.0,
            what=f"{2 * PHASE} answers while broker {victim} is down",
        )
        assert not cluster.node(victim).running, "the killed broker must still be down in phase 2"

        # 3. Restart it while more requests arrive.
        restart = asyncio.create_task(asyncio.to_thread(cluster.start_node, victim, timeout=120))
        await asyncio.wait_for(_produce(s, 2 * PHASE, PHASE), 90)
        await asyncio.wait_for(restart, 150)
        await wait_for(
            lambda: _count_at_least(s, 3 * PHASE),
            timeout=90,
            interval=1.0,
            what=f"all {3 * PHASE} answers after broker {victim} restarted",
        )
    finally:
        stop.set()
        await asyncio.wait_for(echo, 120)

    answers = await _answered(s)
    duplicated = {rid: n for rid, n in answers.items() if n != 1}
    assert not duplicated, f"answered more than once: {sorted(duplicated.items())[:10]}"
    assert set(answers) == {f"r{i}" for i in range(3 * PHASE)}
    log.info("echo incarnations that failed and were replaced: %d (%s)", len(restarts), restarts[:3])

    await _no_under_replicated(cluster, s, victim)


async def _no_under_replicated(cluster: LocalKafkaCluster, s: Settings, victim: int) -> None:
    """The restarted broker catches up: every partition (ours and Kafka's own) back at 3 in-sync
    replicas within 90 s."""
    expected = {n.node_id: n.bootstrap for n in cluster.nodes}

    loop = asyncio.get_running_loop()
    deadline, state = loop.time() + 90, None
    while loop.time() < deadline:
        view = await cluster_view(s, expected=expected)
        down = [b.node_id for b in view.broker_nodes if not b.up]
        short = [f"{r.topic}/{r.partition} isr={r.isr} of {r.replicas}" for r in view.under_replicated]
        state = {"brokers down": down, "under-replicated": short[:5], "offline": len(view.offline)}
        if not down and not short and not view.offline:
            break
        await asyncio.sleep(1.0)
    else:
        raise AssertionError(
            f"the cluster did not recover from the crash of broker {victim} in 90 s: {state}"
        )


async def _count_at_least(settings: Settings, n: int) -> bool:
    return sum((await _answered(settings)).values()) >= n


async def test_a_bulk_job_through_a_broker_crash(
    cluster: LocalKafkaCluster, postgres: PostgresService, tmp_path: Path
) -> None:
    """The real components (processors, worker, audit sink) and a `ragbus bulk` job on the cluster,
    one broker SIGKILLed a third of the way through and restarted at two thirds: every line
    answered exactly once, the audit trail equals the readable records, and no partition is left
    short of replicas."""
    n = 60
    kafka = KafkaService(bootstrap=cluster.bootstrap, kind="local", client=CLIENT)
    s = await pipeline_settings(kafka, postgres, tmp_path, tenants=(NODOCS,), kafka_partitions=3)
    questions, out = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    with questions.open("w") as f:
        for i in range(n):
            body = {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], "max_tokens": 4}
            line = {"custom_id": f"q-{i:02d}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            f.write(json.dumps(line) + "\n")
    args = ["bulk", "submit", str(questions), "--out", str(out), "--tenant", NODOCS, "--job", "crash"]
    args += ["--window", "8", "--no-progress"]

    def answered() -> int:
        return len(out.read_text().splitlines()) if out.exists() else 0

    async def ready(_: Pipeline) -> bool:
        return True

    victim = 2
    async with running_pipeline(s, tmp_path, ["sink", "worker", "processors"], ready=ready) as p:
        bulk = spawn(args, s, tmp_path / "bulk.log")
        try:

            async def past(count: int) -> bool:
                p.assert_alive()
                assert bulk.poll() in (None, 0), (tmp_path / "bulk.log").read_text()[-3000:]
                return answered() >= count or bulk.poll() == 0

            await wait_for(lambda: past(n // 3), timeout=300, what="a third of the bulk job")
            cluster.kill_node(victim)
            await wait_for(lambda: past(2 * n // 3), timeout=300, what="two thirds, one broker down")
            assert not cluster.node(victim).running
            await asyncio.to_thread(cluster.start_node, victim, timeout=120)
            await wait_for(lambda: past(n), timeout=300, what="the whole job after the restart")
            code = await asyncio.to_thread(bulk.wait, 60)
        finally:
            if bulk.poll() is None:
                bulk.kill()
        assert code == 0, (tmp_path / "bulk.log").read_text()[-3000:]
        p.assert_alive()  # no component fell over with the broker

        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(r["custom_id"] for r in rows) == [f"q-{i:02d}" for i in range(n)]
        assert all(r["error"] is None for r in rows), [r for r in rows if r["error"]][:3]
        responses = await read_events(s, s.topics.tenant(NODOCS).responses("bulk"), ChatResponse, timeout=20)
        per_request = Counter(r.request_id for r in responses)
        assert len(per_request) == n and set(per_request.values()) == {1}, per_request.most_common(3)

        expected, _ = await readable_records(s)

        async def audited() -> bool:
            return len((await audit_coords(s.postgres_dsn))[0]) >= len(expected)

        await wait_for(audited, timeout=120, what="the audit sink to catch up")
    coords, duplicates = await audit_coords(s.postgres_dsn)
    assert duplicates == 0 and set(coords) == expected and len(coords) == len(expected)
    await _no_under_replicated(cluster, s, victim)
