"""A read-only look at the cluster for `ragbus status`: topics, end offsets, consumer-group lag.

Lag is what a consumer group still has to read, not the distance between two offsets: ragbus
writes transactionally, and every commit or abort leaves a marker that takes an offset but is never
delivered, so `end offset - committed offset` shows an idle group as behind. Where the committed
offset is short of the end, the records in between are counted with a read_committed consumer, the
way the group itself would see them (bounded: past `LAG_COUNT_LIMIT` records or `LAG_COUNT_SECONDS`
the count is reported as a lower bound).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.kafka.clients import make_admin, make_consumer, security_kwargs
from infra.settings import Settings

#: Records counted per consumer group before its lag is reported as "at least" the count.
LAG_COUNT_LIMIT = 10_000
#: Seconds spent counting one group's backlog before its lag is reported as "at least" the count.
LAG_COUNT_SECONDS = 5.0
#: Bytes fetched per partition while counting (the product's consumers fetch up to 32 MiB).
_COUNT_FETCH_BYTES = 1024 * 1024


@dataclass
class TopicInfo:
    name: str
    partitions: int
    end_offsets: dict[int, int]

    @property
    def messages(self) -> int:
        """Sum of end offsets: records ever written (transaction markers included)."""
        return sum(self.end_offsets.values())


@dataclass
class GroupInfo:
    group_id: str
    #: Topic → committed records the group has not consumed yet (markers and aborted records
    #: excluded). For the topics in `lag_at_least` the count was cut short: the lag is at least this.
    lag: dict[str, int] = field(default_factory=dict)
    lag_at_least: list[str] = field(default_factory=list)

    @property
    def total_lag(self) -> int:
        return sum(self.lag.values())

    @property
    def exact(self) -> bool:
        return not self.lag_at_least


@dataclass
class ClusterView:
    brokers: int
    topics: list[TopicInfo]
    groups: list[GroupInfo]


async def end_offsets(settings: Settings, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """High watermarks (read_uncommitted end offsets) of the given partitions."""
    if not tps:
        return {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap,
        client_id=f"{settings.kafka_client_id}-inspect",
        request_timeout_ms=settings.kafka_request_timeout_ms,
        **security_kwargs(settings),
    )
    await consumer.start()
    try:
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()


class BacklogCounter:
    """Counts, per partition, the records a read_committed consumer would get from a start offset
    up to the partition's last stable offset (LSO)."""

    def __init__(
        self, settings: Settings, *, limit: int = LAG_COUNT_LIMIT, seconds: float = LAG_COUNT_SECONDS
    ):
        self.limit = limit
        self.seconds = seconds
        self._started = False
        self._consumer = make_consumer(
            settings,
            group_id=None,
            client_id=f"{settings.kafka_client_id}-inspect-lag",
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=_COUNT_FETCH_BYTES,
            fetch_max_bytes=4 * _COUNT_FETCH_BYTES,
        )

    async def __aenter__(self) -> BacklogCounter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Started only when there was something to count: stop() right after start() raises
        # CancelledError for a consumer without a group (aiokafka 0.14), and most groups have no backlog.
        if self._started:
            await self._consumer.stop()

    async def count(self, starts: dict[TopicPartition, int]) -> tuple[dict[TopicPartition, int], set[str]]:
        """(partition → records from its start offset to its LSO, topics whose count was cut short)."""
        consumer = self._consumer
        counts = dict.fromkeys(starts, 0)
        if not starts:
            return counts, set()
        if not self._started:
            await consumer.start()
            self._started = True
        # The consumer reads committed records only, so its end offsets are the LSOs.
        stable = await consumer.end_offsets(list(starts))
        pending = {tp for tp, start in starts.items() if start < stable[tp]}
        if not pending:
            return counts, set()
        consumer.assign(sorted(pending))
        for tp in pending:
            consumer.seek(tp, starts[tp])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        total = 0
        while pending and total < self.limit:
            left = deadline - loop.time()
            if left <= 0:
                break
            batch = await consumer.getmany(
                *pending, timeout_ms=max(1, int(min(left, 0.2) * 1000)), max_records=self.limit - total
            )
            for tp, records in batch.items():
                n = sum(1 for r in records if r.offset < stable[tp])
                counts[tp] += n
                total += n
            # A fetch that met only markers returns no records but still moves the position past them.
            for tp in list(pending):
                if await consumer.position(tp) >= stable[tp]:
                    pending.discard(tp)
                    consumer.pause(tp)  # nothing more to fetch there
        # Paused, not unassigned: stop() hangs after unsubscribe() of a manual assignment (aiokafka 0.14).
        consumer.pause(*consumer.assignment())
        return counts, {tp.topic for tp in pending}


async def cluster_view(settings: Settings, *, group_prefix: str | None = None) -> ClusterView:
    prefix = settings.topic_prefix + "."
    admin = make_admin(settings)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        topics = sorted(t for t in await admin.list_topics() if t.startswith(prefix))
        described = await admin.describe_topics(topics) if topics else []
        tps = [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]
        offsets = await end_offsets(settings, tps)
        per_topic: dict[str, dict[int, int]] = defaultdict(dict)
        for tp, off in offsets.items():
            per_topic[tp.topic][tp.partition] = off
        infos = [TopicInfo(t, len(per_topic[t]), dict(sorted(per_topic[t].items()))) for t in topics]
        wanted = group_prefix if group_prefix is not None else settings.topic_prefix
        group_ids = sorted(g for g, _protocol in await admin.list_consumer_groups() if g.startswith(wanted))
        committed = {g: await admin.list_consumer_group_offsets(g) for g in group_ids}
    finally:
        await admin.close()
    groups = []
    async with BacklogCounter(settings) as counter:
        for group_id in group_ids:
            info = GroupInfo(group_id)
            # Only partitions whose committed offset is short of the high watermark can have lag.
            starts = {
                tp: meta.offset
                for tp, meta in committed[group_id].items()
                if tp in offsets and meta.offset >= 0
            }
            for tp in starts:
                info.lag.setdefault(tp.topic, 0)
            behind = {tp: start for tp, start in starts.items() if start < offsets[tp]}
            counts, cut_short = await counter.count(behind)
            for tp, n in counts.items():
                info.lag[tp.topic] += n
            info.lag_at_least = sorted(cut_short)
            groups.append(info)
    return ClusterView(brokers=len(cluster.get("brokers", [])), topics=infos, groups=groups)
