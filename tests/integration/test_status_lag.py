"""`ragbus status` lag counts records a consumer group has not read, not offsets: transaction markers
and aborted records take offsets on a transactionally written topic but are never delivered, so an
idle group that has read everything shows lag 0."""

from __future__ import annotations

import json

from aiokafka import TopicPartition

from infra.kafka.clients import make_consumer, make_producer
from infra.kafka.inspect import BacklogCounter, GroupInfo, cluster_view, end_offsets
from infra.settings import Settings
from tests.helpers import run_ragbus, wait_for


async def _write(settings: Settings, topic: str, batches: list[int], *, abort: bool = False) -> None:
    """One transaction per entry of `batches`, each with that many records spread over partitions."""
    producer = make_producer(settings, transactional_id=f"{settings.topic_prefix}.lag-test")
    await producer.start()
    try:
        for i, n in enumerate(batches):
            await producer.begin_transaction()
            for j in range(n):
                await producer.send(topic, f"value {i}.{j}".encode(), key=f"k{i}.{j}".encode())
            if abort:
                await producer.abort_transaction()
            else:
                await producer.commit_transaction()
    finally:
        await producer.stop()


async def _consume_and_commit(settings: Settings, topic: str, group: str, expected: int) -> None:
    """Read `expected` records as `group` and commit last offset + 1 per partition, as the
    product's transactional stages do (send_offsets_to_transaction), leaving the markers after it."""
    consumer = make_consumer(settings, topic, group_id=group, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        last: dict[TopicPartition, int] = {}
        seen = 0

        async def read_all() -> bool:
            nonlocal seen
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                seen += len(records)
                last[tp] = records[-1].offset
            return seen >= expected

        await wait_for(read_all, timeout=30, what=f"{expected} records on {topic}")
        assert seen == expected
        await consumer.commit({tp: off + 1 for tp, off in last.items()})
    finally:
        await consumer.stop()


async def _group(settings: Settings, group: str) -> GroupInfo:
    view = await cluster_view(settings)
    return next(g for g in view.groups if g.group_id == group)


async def test_idle_group_on_transactional_topic_has_no_lag(settings: Settings) -> None:
    topic = settings.topics.tenant("default").requests("chat")
    group = f"{settings.topic_prefix}.lag-test"
    await _write(settings, topic, [3, 1, 4, 2])  # N=10 records in K=4 transactions
    await _write(settings, topic, [2], abort=True)  # never delivered to a read_committed group
    await _consume_and_commit(settings, topic, group, 10)

    info = await _group(settings, group)
    assert info.lag == {topic: 0} and info.exact
    # The markers (and the aborted records) are there: the offset distance alone is not 0.
    tps = [TopicPartition(topic, p) for p in range(settings.kafka_partitions or 1)]
    ends = await end_offsets(settings, tps)
    assert sum(ends.values()) >= 10 + 4 + 2 + 1

    await _write(settings, topic, [3])
    info = await _group(settings, group)
    assert info.lag == {topic: 3} and info.total_lag == 3 and info.exact

    # The same numbers reach `ragbus status --json`.
    _code, out, err = await run_ragbus(settings, "status", "--json", timeout=120)
    groups = {g["group_id"]: g for g in json.loads(out)["groups"]}
    assert groups[group]["total_lag"] == 3 and groups[group]["exact"] is True, err


async def test_lag_count_is_bounded_and_says_so(settings: Settings) -> None:
    topic = settings.topics.tenant("default").requests("chat")
    await _write(settings, topic, [5])
    tps = [TopicPartition(topic, p) for p in range(settings.kafka_partitions or 1)]
    async with BacklogCounter(settings, limit=2) as counter:
        counts, cut_short = await counter.count(dict.fromkeys(tps, 0))
        assert sum(counts.values()) == 2 and cut_short == {topic}
    async with BacklogCounter(settings) as counter:
        counts, cut_short = await counter.count(dict.fromkeys(tps, 0))
        assert sum(counts.values()) == 5 and cut_short == set()
