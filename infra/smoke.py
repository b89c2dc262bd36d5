"""A produce/consume round-trip through every declared topic: proves the stack carries the
contract end to end (broker, topics, codec, headers) before any component runs.

It covers the shared topics and one tenant's own (`settings.tenant`). It writes replies and
internal topics and reads requests back, which only ragbus's components may do, so it runs with
the components' credentials, not the tenant's."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiokafka import TopicPartition

from infra.kafka.clients import make_consumer, make_producer
from infra.kafka.codec import decode_record, encode
from infra.settings import Settings
from schemas import (
    CancelRequest,
    ChatRequest,
    ChatResponse,
    DeadLetter,
    DocumentIngest,
    EnrichedRequest,
    EventBase,
    IngestResult,
    RetrievedChunk,
    TokenChunk,
)
from schemas.topics import TOPICS


def sample_event(model: type[EventBase], request_id: str, tenant: str = "smoke") -> EventBase:
    env = {"request_id": request_id, "tenant_id": tenant, "user_id": "ragbus-smoke"}
    if model is ChatRequest:
        return ChatRequest(question="What does ragbus carry?", **env)
    if model is EnrichedRequest:
        req = ChatRequest(question="What does ragbus carry?", **env)
        chunk = RetrievedChunk(chunk_id="c1", doc_id="d1", text="ragbus carries questions.", score=0.9)
        return EnrichedRequest(request=req, chunks=[chunk], **env)
    if model is ChatResponse:
        return ChatResponse(answer="Questions and answers.", finish_reason="stop", **env)
    if model is TokenChunk:
        return TokenChunk(index=0, text="Questions", **env)
    if model is DocumentIngest:
        return DocumentIngest(doc_id="smoke-doc", text="ragbus smoke document", **env)
    if model is IngestResult:
        return IngestResult(doc_id="smoke-doc", op="upsert", status="ok", chunks=1, **env)
    if model is CancelRequest:
        return CancelRequest(reason="smoke", **env)
    if model is DeadLetter:
        return DeadLetter(
            source_topic="smoke",
            source_partition=0,
            source_offset=0,
            original_value=b"\xff",
            error_class="invalid_utf8",
            error_message="smoke",
            stage="smoke",
            **env,
        )
    raise ValueError(model)


@dataclass
class RoundTrip:
    topic: str
    ok: bool
    millis: float
    detail: str = ""


async def round_trip(settings: Settings, timeout: float = 30.0) -> list[RoundTrip]:
    """Send one event per topic (the shared ones and `settings.tenant`'s), read each back by its
    offset, and compare. A missing topic is a failed row that says so, not an error."""
    request_id = f"smoke-{time.time_ns()}"
    producer = make_producer(settings, client_id="ragbus-smoke")
    consumer = make_consumer(settings, group_id=None, client_id="ragbus-smoke", fetch_max_wait_ms=20)
    await producer.start()
    await consumer.start()
    results: list[RoundTrip] = []
    tenant = settings.tenant
    try:
        present = await consumer.topics()
        for spec in TOPICS:
            topic = spec.name(settings.topic_prefix, tenant if spec.per_tenant else None)
            if topic not in present:
                hint = f"missing: declare tenant {tenant}'s topics" if spec.per_tenant else "missing"
                results.append(RoundTrip(topic, False, 0.0, hint))
                continue
            # The tenant's own on its topics, as the processors require (the TRUST RULE).
            event = sample_event(spec.event, request_id, tenant)
            started = time.perf_counter()
            enc = encode(event)
            meta = await producer.send_and_wait(topic, enc.value, key=enc.key, headers=enc.headers)
            tp = TopicPartition(topic, meta.partition)
            consumer.assign([tp])
            consumer.seek(tp, meta.offset)
            got = None
            deadline = time.monotonic() + timeout
            while got is None and time.monotonic() < deadline:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                for record in batch.get(tp, []):
                    if record.offset == meta.offset:
                        got = record
            if got is None:
                results.append(RoundTrip(topic, False, 0.0, "not read back"))
                continue
            back = decode_record(got, spec.event, max_bytes=spec.max_event_bytes)
            same = back.model_dump() == event.model_dump()
            results.append(
                RoundTrip(topic, same, (time.perf_counter() - started) * 1000, "" if same else "differs")
            )
    finally:
        await consumer.stop()
        await producer.stop()
    return results


def run(settings: Settings) -> list[RoundTrip]:
    return asyncio.run(round_trip(settings))
