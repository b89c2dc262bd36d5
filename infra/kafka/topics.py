"""Declares the ragbus topics (one list, in `schemas.topics`) on a cluster, idempotently."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import for_code

from infra.kafka.clients import make_admin, make_consumer
from infra.settings import Settings
from schemas.topics import TOPICS

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36


@dataclass
class Declared:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    #: Existing topics with fewer partitions than declared: left alone (changing the count
    #: remaps keys to partitions, which is an operator's decision).
    under_partitioned: dict[str, tuple[int, int]] = field(default_factory=dict)


async def declare_topics(settings: Settings) -> Declared:
    """Create every declared topic that is missing; report the ones that exist."""
    prefix = settings.topic_prefix
    result = Declared()
    admin = make_admin(settings)
    await admin.start()
    try:
        present = set(await admin.list_topics())
        wanted = []
        for spec in TOPICS:
            name = spec.name(prefix)
            partitions = settings.kafka_partitions or spec.partitions
            if name in present:
                result.existing.append(name)
                continue
            wanted.append(
                NewTopic(
                    name=name,
                    num_partitions=partitions,
                    replication_factor=settings.kafka_replication_factor,
                    topic_configs=spec.configs(),
                )
            )
        if wanted:
            response = await admin.create_topics(wanted)
            for topic, code, *rest in response.topic_errors:
                if code == 0:
                    result.created.append(topic)
                elif code == TOPIC_ALREADY_EXISTS:
                    result.existing.append(topic)
                else:
                    message = rest[0] if rest else ""
                    raise for_code(code)(f"creating topic {topic}: {message}")
        if result.existing:
            described = await admin.describe_topics(result.existing)
            for entry in described:
                name, parts = entry["topic"], len(entry["partitions"])
                spec = next(t for t in TOPICS if t.name(prefix) == name)
                declared = settings.kafka_partitions or spec.partitions
                if parts < declared:
                    result.under_partitioned[name] = (parts, declared)
                    log.warning("topic %s has %d partitions, %d declared", name, parts, declared)
    finally:
        await admin.close()
    await wait_for_leaders(settings, result.created + result.existing)
    log.info("topics: %d created, %d already present", len(result.created), len(result.existing))
    return result


async def wait_for_leaders(settings: Settings, topics: list[str], timeout: float = 30.0) -> None:
    """Return once every partition of `topics` has a leader that serves it.

    Topic creation returns before the partitions have leaders, and a broker that has just (re)started
    lists leaders before it serves them: clients started in that window log NotLeaderForPartition
    until it closes. So the metadata must show a leader for every partition, and then each leader
    must answer a ListOffsets request for it, which it does only once it leads the partition.
    """
    if not topics:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    waiting = list(topics)
    described: dict[str, dict[str, Any]] = {}
    admin = make_admin(settings)
    await admin.start()
    try:
        while waiting and loop.time() < deadline:
            described = {t["topic"]: t for t in await admin.describe_topics(topics)}
            waiting = [name for name in topics if not _led(described.get(name))]
            if waiting:
                await asyncio.sleep(0.1)
        tps = [
            TopicPartition(t["topic"], p["partition"]) for t in described.values() for p in t["partitions"]
        ]
    finally:
        await admin.close()
    if waiting:
        raise TimeoutError(
            f"partitions of {', '.join(sorted(waiting))} have no leader after {timeout:.0f} s; "
            f"check the broker log and that its controller is up"
        )
    consumer = make_consumer(settings, group_id=None, client_id=f"{settings.kafka_client_id}-declare")
    await consumer.start()
    try:
        # aiokafka retries NotLeaderForPartition here quietly, with fresh metadata.
        async with asyncio.timeout(max(0.0, deadline - loop.time())):
            await consumer.end_offsets(tps)
    except TimeoutError as exc:
        raise TimeoutError(
            f"the leaders of {', '.join(sorted(topics))} do not serve their partitions "
            f"after {timeout:.0f} s; check the broker log"
        ) from exc
    finally:
        await consumer.stop()


def _led(topic: dict[str, Any] | None) -> bool:
    """Whether a topic's metadata (from describe_topics) shows a leader for each partition."""
    return (
        topic is not None
        and topic["error_code"] == 0
        and bool(topic["partitions"])
        and all(p["leader"] >= 0 for p in topic["partitions"])
    )
