"""Declares the ragbus topics (one list, in `schemas.topics`) on a cluster, idempotently: missing
topics are created with their declared configs, and existing topics whose configs differ from the
declaration are brought up to date (so `ragbus up` fixes a deployment declared by an older ragbus)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import for_code

from infra.kafka.broker import min_insync
from infra.kafka.clients import make_admin, make_consumer
from infra.kafka.protocol import IncrementalAlterConfigs
from infra.settings import Settings
from schemas.topics import SHARED_TOPICS, TENANT_TOPICS, TopicSpec, spec_for_topic

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36


@dataclass
class Declared:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    #: Existing topics with fewer partitions than declared: left alone (changing the count
    #: remaps keys to partitions, which is an operator's decision).
    under_partitioned: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Existing topics whose configs were brought up to the declared values: name → {config: value}.
    reconfigured: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Replication factor the created topics got (existing topics keep theirs).
    replication_factor: int = 1


async def replication_for(settings: Settings, admin: AIOKafkaAdminClient) -> int:
    """The replication factor for new topics: the setting, else min(3, live brokers) from the
    cluster's metadata, so one broker stays RF 1 and a 3-broker cluster gets RF 3."""
    if settings.kafka_replication_factor is not None:
        return settings.kafka_replication_factor
    cluster = await admin.describe_cluster()
    return max(1, min(3, len(cluster.get("brokers", []))))


def declared_names(prefix: str, tenants: Iterable[str] = ()) -> dict[str, TopicSpec]:
    """Full name → spec of the shared topics and of each tenant's own topics."""
    names = {spec.name(prefix): spec for spec in SHARED_TOPICS}
    for tenant in tenants:
        names.update({spec.name(prefix, tenant): spec for spec in TENANT_TOPICS})
    return names


async def declare_topics(settings: Settings, tenants: Iterable[str] = ()) -> Declared:
    """Create every declared topic that is missing (the shared ones, and each of `tenants`' own);
    bring the configs of the ones that exist up to the declared values (configs the declaration
    does not name are left as they are)."""
    prefix = settings.topic_prefix
    declared = declared_names(prefix, tenants)
    result = Declared()
    admin = make_admin(settings)
    await admin.start()
    try:
        present = set(await admin.list_topics())
        replication = result.replication_factor = await replication_for(settings, admin)
        # With replicas to spare an acks=all write needs two of them, so no acknowledged record
        # lives on one broker only; with fewer, the broker's default (1).
        durability = {"min.insync.replicas": str(min_insync(replication))} if replication > 1 else {}
        wanted = []
        for name, spec in declared.items():
            partitions = settings.kafka_partitions or spec.partitions
            if name in present:
                result.existing.append(name)
                continue
            wanted.append(
                NewTopic(
                    name=name,
                    num_partitions=partitions,
                    replication_factor=replication,
                    topic_configs=spec.configs() | durability,
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
                wanted_parts = settings.kafka_partitions or declared[name].partitions
                if parts < wanted_parts:
                    result.under_partitioned[name] = (parts, wanted_parts)
                    log.warning("topic %s has %d partitions, %d declared", name, parts, wanted_parts)
            result.reconfigured = await _align_configs(admin, result.existing, prefix)
    finally:
        await admin.close()
    await wait_for_leaders(settings, result.created + result.existing)
    log.info(
        "topics: %d created, %d already present (%d reconfigured)",
        len(result.created),
        len(result.existing),
        len(result.reconfigured),
    )
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


async def _align_configs(
    admin: AIOKafkaAdminClient, topics: list[str], prefix: str, timeout: float = 30.0
) -> dict[str, dict[str, str]]:
    """Set, on each of `topics`, every declared config whose current value differs; returns what
    was changed. Incremental (KIP-339): configs outside the declaration keep their values, so an
    operator's own overrides (say `min.insync.replicas`) survive."""
    wanted = {name: _spec(name, prefix).configs() for name in topics}
    current = await _described(admin, wanted)
    changes = _differing(wanted, current)
    if not changes:
        return {}
    response = await admin._send_request(IncrementalAlterConfigs(changes))  # noqa: SLF001 - aiokafka's admin has no incremental alter
    for code, message, _type, name in response.responses:
        if code != 0:
            raise for_code(code)(
                f"setting {', '.join(f'{k}={v}' for k, v in changes.get(name, {}).items())} on topic "
                f"{name}: {message}; the principal needs ALTER_CONFIGS on the topic"
            )
    for name, diff in changes.items():
        log.warning(
            "topic %s: configs brought up to the declaration: %s",
            name,
            ", ".join(f"{k} {current.get(name, {}).get(k)!r} -> {v!r}" for k, v in diff.items()),
        )
    # The controller has committed the change; brokers apply it a moment later. Return once they
    # serve it, so what starts after `ragbus up` already gets broker timestamps.
    deadline = asyncio.get_running_loop().time() + timeout
    while pending := _differing(changes, await _described(admin, changes)):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(
                f"the brokers do not show the new configs of {', '.join(sorted(pending))} after "
                f"{timeout:.0f} s; check the broker log, then run `ragbus topics declare` again"
            )
        await asyncio.sleep(0.1)
    return changes


def _spec(name: str, prefix: str) -> TopicSpec:
    found = spec_for_topic(name, prefix)
    if found is None:
        raise LookupError(f"{name} is not a declared ragbus topic under prefix {prefix!r}")
    return found


async def _described(
    admin: AIOKafkaAdminClient, wanted: dict[str, dict[str, str]]
) -> dict[str, dict[str, str]]:
    """The current values of the configs named in `wanted` (topic → {key: value})."""
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name, dict(cfg)) for name, cfg in wanted.items()]
    )
    current: dict[str, dict[str, str]] = {}
    for response in responses:
        for code, message, _type, name, entries, *_ in response.resources:
            if code != 0:
                raise for_code(code)(
                    f"describing the configs of topic {name}: {message}; "
                    f"the principal needs DESCRIBE_CONFIGS on the topic"
                )
            current[name] = {entry[0]: entry[1] for entry in entries}
    return current


def _differing(
    wanted: dict[str, dict[str, str]], current: dict[str, dict[str, str]]
) -> dict[str, dict[str, str]]:
    """Per topic, the wanted configs whose current value is another (topics with none left out)."""
    changes = {
        name: {key: value for key, value in cfg.items() if current.get(name, {}).get(key) != value}
        for name, cfg in wanted.items()
    }
    return {name: diff for name, diff in changes.items() if diff}
