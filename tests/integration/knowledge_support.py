"""Shared pieces of the knowledge tests: the embedding model (loaded once per test session), the
processors running in the test's event loop, and producing events / waiting for their results."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, TypeVar

from infra.kafka.clients import make_producer
from infra.kafka.codec import encode
from infra.settings import Settings
from processors.service import Processors
from processors.store import ChunkStore
from schemas import ChatRequest, DocumentIngest, EnrichedRequest, EventBase, IngestResult
from tests.helpers import read_events, wait_for
from tests.integration.knowledge_corpus import Doc

E = TypeVar("E", bound=EventBase)


@functools.cache
def shared_model() -> Any:
    """The default embedding model, loaded once per test process whichever module asks first."""
    from processors.embedding import load_model

    return load_model(Settings(_env_file=None).embedding_model)  # type: ignore[call-arg]


async def start_processors(settings: Settings) -> tuple[Processors, asyncio.Task[None], asyncio.Event]:
    """The processors on this event loop, sharing the session's model, once they own partitions:
    (processors, their run task, the event that stops them)."""
    processors = Processors(settings, model=shared_model())
    stop = asyncio.Event()
    task = asyncio.create_task(processors.run(stop))
    ready = asyncio.ensure_future(processors.ready.wait())
    done, _ = await asyncio.wait([task, ready], timeout=120, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()  # raises why it stopped
    if not ready.done():
        stop.set()
        raise AssertionError("the processors got no partitions within 120 s")
    return processors, task, stop


@contextlib.asynccontextmanager
async def running_processors(settings: Settings) -> AsyncIterator[Processors]:
    """The processors on this event loop while the block runs."""
    processors, task, stop = await start_processors(settings)
    try:
        yield processors
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def produce(settings: Settings, topic: str, events: Iterable[EventBase | bytes]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for event in events:
            if isinstance(event, bytes):
                await producer.send(topic, event, key=b"raw")
            else:
                enc = encode(event)
                await producer.send(topic, enc.value, key=enc.key, headers=enc.headers)
        await producer.flush()
    finally:
        await producer.stop()


def ingest_event(doc: Doc, **overrides: Any) -> DocumentIngest:
    fields: dict[str, Any] = {
        "tenant_id": doc.tenant,
        "doc_id": doc.doc_id,
        "content_type": doc.content_type,
        "text": doc.text,
        "data": doc.data,
        "source": f"corpus/{doc.doc_id}",
    }
    fields.update(overrides)
    return DocumentIngest(**fields)


async def collect(
    settings: Settings,
    topics: Sequence[str],
    model: type[E],
    request_ids: Iterable[str],
    *,
    timeout: float = 120,
) -> dict[str, E]:
    """Wait until every request id has an event of `model` on one of `topics`; returns them by id.
    Fails on a duplicate."""
    wanted = set(request_ids)

    async def check() -> dict[str, E] | None:
        found: dict[str, E] = {}
        for topic in topics:
            for event in await read_events(settings, topic, model, timeout=5):
                if event.request_id in wanted:
                    assert event.request_id not in found, f"two {model.__name__} for {event.request_id}"
                    found[event.request_id] = event
        return found if wanted <= set(found) else None

    return await wait_for(check, timeout=timeout, interval=0.5, what=f"{len(wanted)} {model.__name__} events")


async def ingest(settings: Settings, events: Sequence[DocumentIngest]) -> dict[str, IngestResult]:
    """Each event on its tenant's docs.ingest topic; their results from those tenants' docs.ingested."""
    tenants = sorted({e.tenant_id for e in events})
    for tenant in tenants:
        await produce(
            settings, settings.topics.tenant(tenant).docs_ingest, [e for e in events if e.tenant_id == tenant]
        )
    results = await collect(
        settings,
        [settings.topics.tenant(t).docs_ingested for t in tenants],
        IngestResult,
        [e.request_id for e in events],
    )
    return {e.request_id: results[e.request_id] for e in events}


async def ask(settings: Settings, requests: list[ChatRequest]) -> dict[str, EnrichedRequest]:
    """Each request on its own tenant's and lane's request topic."""
    for tenant in sorted({r.tenant_id for r in requests}):
        for lane in ("chat", "bulk"):
            mine = [r for r in requests if r.lane == lane and r.tenant_id == tenant]
            if mine:
                await produce(settings, settings.topics.tenant(tenant).requests(lane), mine)
    topics = [settings.topics.enriched("chat"), settings.topics.enriched("bulk")]
    return await collect(settings, topics, EnrichedRequest, [r.request_id for r in requests])


def stored_texts(store: ChunkStore, tenant: str, doc_ids: list[str]) -> set[str]:
    return {row["text"] for doc_id in doc_ids for row in store.chunks_of(tenant, doc_id)}
