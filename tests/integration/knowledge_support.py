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
from schemas import ChatRequest, DocumentIngest, EnrichedRequest, EventBase, IngestResult, RetrievalOptions
from tests.helpers import read_events, wait_for
from tests.integration.knowledge_corpus import ACME, GLOBEX, QUESTIONS, Doc, Question

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


def tenants_texts(store: ChunkStore, docs: Sequence[Doc]) -> dict[str, set[str]]:
    """The stored chunk texts of each corpus tenant's documents; asserts the corpus's shape (ACME's
    17 chunks, none shared with GLOBEX)."""
    own = {
        tenant: stored_texts(store, tenant, [d.doc_id for d in docs if d.tenant == tenant])
        for tenant in (ACME, GLOBEX)
    }
    assert len(own[ACME]) == 17 and own[ACME].isdisjoint(own[GLOBEX])
    return own


def corpus_requests() -> list[tuple[ChatRequest, Question]]:
    """Every corpus question asked on both lanes: the chat lane dense, the bulk lane hybrid, for
    its top 3 chunks."""
    return [
        (
            ChatRequest(
                tenant_id=q.tenant,
                question=q.text,
                lane=lane,
                retrieval=RetrievalOptions(top_k=3, hybrid=hybrid),
            ),
            q,
        )
        for q in QUESTIONS
        for lane, hybrid in (("chat", False), ("bulk", True))
    ]


def found_answer(out: EnrichedRequest, q: Question) -> None:
    """Asserts that a chunk of the right document holding the answer came back."""
    assert any(c.doc_id == q.doc_id and q.answer in c.text for c in out.chunks), (
        f"{q.tenant}: {q.text!r} (hybrid={out.request.retrieval.hybrid}) got "
        f"{[c.text[:50] for c in out.chunks]}"
    )
