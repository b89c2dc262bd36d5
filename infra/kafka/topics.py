"""Declares the ragbus topics (one list, in `schemas.topics`) on a cluster, idempotently."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code

from infra.kafka.clients import make_admin
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
        if result.created:
            await _wait_for_leaders(admin, result.created)
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
    log.info("topics: %d created, %d already present", len(result.created), len(result.existing))
    return result


async def _wait_for_leaders(admin: AIOKafkaAdminClient, topics: list[str], timeout: float = 30.0) -> None:
    """Creation returns before every partition has a leader; wait so clients start cleanly."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        described = await admin.describe_topics(topics)
        ready = all(
            t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
            for t in described
        )
        if ready and len(described) == len(topics):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"topics without partition leaders after {timeout:.0f} s")
        await asyncio.sleep(0.1)
