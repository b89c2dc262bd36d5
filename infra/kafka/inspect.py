"""A read-only look at the cluster for `ragbus status`: topics, end offsets, consumer-group lag."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.kafka.clients import make_admin, security_kwargs
from infra.settings import Settings


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
    lag: dict[str, int] = field(default_factory=dict)

    @property
    def total_lag(self) -> int:
        return sum(self.lag.values())


@dataclass
class ClusterView:
    brokers: int
    topics: list[TopicInfo]
    groups: list[GroupInfo]


async def end_offsets(settings: Settings, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap,
        client_id=f"{settings.kafka_client_id}-inspect",
        request_timeout_ms=settings.kafka_request_timeout_ms,
        **security_kwargs(settings),
    )
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        if not tps:
            for t in topics:
                await consumer._client.force_metadata_update()  # noqa: SLF001 - fresh metadata for new topics
                tps.extend(TopicPartition(t, p) for p in (consumer.partitions_for_topic(t) or ()))
        return await consumer.end_offsets(tps) if tps else {}
    finally:
        await consumer.stop()


async def cluster_view(settings: Settings, *, group_prefix: str | None = None) -> ClusterView:
    prefix = settings.topic_prefix + "."
    admin = make_admin(settings)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        topics = sorted(t for t in await admin.list_topics() if t.startswith(prefix))
        offsets = await end_offsets(settings, topics)
        per_topic: dict[str, dict[int, int]] = defaultdict(dict)
        for tp, off in offsets.items():
            per_topic[tp.topic][tp.partition] = off
        infos = [TopicInfo(t, len(per_topic[t]), dict(sorted(per_topic[t].items()))) for t in topics]
        groups = []
        wanted = group_prefix if group_prefix is not None else settings.topic_prefix
        for group_id, _protocol in sorted(await admin.list_consumer_groups()):
            if not group_id.startswith(wanted):
                continue
            committed = await admin.list_consumer_group_offsets(group_id)
            info = GroupInfo(group_id)
            for tp, meta in committed.items():
                if tp in offsets and meta.offset >= 0:
                    info.lag[tp.topic] = info.lag.get(tp.topic, 0) + max(0, offsets[tp] - meta.offset)
            groups.append(info)
        return ClusterView(brokers=len(cluster.get("brokers", [])), topics=infos, groups=groups)
    finally:
        await admin.close()
