"""Shared by the audit sink's integration tests: what Kafka holds vs what audit_log holds."""

from __future__ import annotations

import random
import time
from typing import Any

import asyncpg

from infra.kafka.clients import make_admin, make_consumer, topic_partitions
from infra.kafka.codec import Encoded, encode
from infra.settings import Settings
from infra.smoke import sample_event
from schemas import ChatRequest, ChatResponse, TokenChunk, Usage
from schemas.topics import TOPICS

Coord = tuple[str, int, int]


async def prefix_topics(settings: Settings) -> list[str]:
    admin = make_admin(settings)
    await admin.start()
    try:
        return sorted(t for t in await admin.list_topics() if t.startswith(settings.topic_prefix + "."))
    finally:
        await admin.close()


async def readable_records(settings: Settings, *, timeout: float = 60.0) -> tuple[set[Coord], int]:
    """(coordinates of every record a read_committed consumer reads on the prefix's topics, sum of
    end offsets). End offsets over-count: transaction markers and aborted records take offsets."""
    topics = await prefix_topics(settings)
    consumer = make_consumer(settings, group_id=None, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        tps = await topic_partitions(settings, consumer, topics)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        seen: set[Coord] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps):
                break
            for recs in (await consumer.getmany(timeout_ms=200, max_records=5000)).values():
                seen.update((r.topic, r.partition, r.offset) for r in recs)
        else:
            raise AssertionError("could not read the topics to their end")
        return seen, sum(ends.values())
    finally:
        await consumer.stop()


async def audit_coords(dsn: str) -> tuple[list[Coord], int]:
    """(coordinates of every audit row, how many (topic, partition, offset) occur twice or more)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch('SELECT topic, "partition", "offset" FROM audit_log')
        dups = await conn.fetchval(
            'SELECT count(*) FROM (SELECT 1 FROM audit_log GROUP BY topic, "partition", "offset" '
            "HAVING count(*) > 1) d"
        )
        return [(r[0], r[1], r[2]) for r in rows], dups
    finally:
        await conn.close()


async def row_count(dsn: str) -> int:
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return -1
    try:
        return await conn.fetchval("SELECT count(*) FROM audit_log")
    except asyncpg.PostgresError:  # the sink has not created the table yet
        return -1
    finally:
        await conn.close()


def mixed_event(settings: Settings, rng: random.Random, n: int) -> tuple[str, Encoded | bytes]:
    """One event for a random declared topic (a tenant topic of a test tenant, the event naming that
    tenant), or (1 in 10) garbage bytes for a requests topic."""
    tenant = rng.choice(["acme", "t"])
    t = settings.topics.tenant(tenant)
    if rng.random() < 0.1:
        return t.requests(rng.choice(["chat", "bulk"])), rng.choice(
            [b"\xff\xfe not utf-8", b"not json {", b"[1, 2]", b'{"question": "no tenant"}']
        )
    kind = rng.random()
    env = {"tenant_id": tenant, "user_id": f"u{n % 7}", "request_id": f"r{n}"}
    if kind < 0.3:
        return t.requests("chat"), encode(ChatRequest(question=f"question {n}", client_ip="10.0.0.1", **env))
    if kind < 0.5:
        usage = Usage(prompt_tokens=n % 100, completion_tokens=n % 10)
        return t.responses("chat"), encode(ChatResponse(answer=f"answer {n}", usage=usage, **env))
    if kind < 0.7:
        return t.tokens, encode(TokenChunk(index=n % 5, text="tok", **env))
    spec = rng.choice(TOPICS)
    event = sample_event(spec.event, f"r{n}").model_copy(update={"tenant_id": tenant})
    return spec.name(settings.topic_prefix, tenant if spec.per_tenant else None), encode(event)


async def send(producer: Any, topic: str, item: Encoded | bytes) -> Any:
    if isinstance(item, bytes):
        return await producer.send(topic, item, key=b"garbage")
    return await producer.send(topic, item.value, key=item.key, headers=item.headers)
