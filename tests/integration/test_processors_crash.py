"""The processors as a real child process (`ragbus processors run`), killed with SIGKILL while
questions and documents stream through, then restarted: every request comes out enriched exactly
once and every document has exactly one IngestResult, for read_committed readers."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from infra.milvus import make_milvus_client
from infra.settings import Settings
from processors.service import ProcessorsError
from processors.store import ChunkStore
from schemas import ChatRequest, DocumentIngest, EnrichedRequest, IngestResult
from tests.helpers import read_topic, spawn, wait_for
from tests.integration.knowledge_corpus import ACME, GLOBEX, HANDBOOK_MD, QUESTIONS, documents
from tests.integration.knowledge_support import (
    collect,
    ingest_event,
    produce,
    running_processors,
    start_processors,
)

log = logging.getLogger(__name__)

REQUESTS = 600
DOCS_DURING_CRASH = 6


async def committed_count(settings: Settings, topics: list[str]) -> int:
    total = 0
    for topic in topics:
        total += len(await read_topic(settings, topic, timeout=10))
    return total


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


async def test_sigkill_mid_stream_then_restart_yields_each_output_exactly_once(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings
    t = s.topics
    enriched_topics = [t.enriched("chat"), t.enriched("bulk")]
    rng = random.Random(11)

    first = spawn(["processors", "run"], s, tmp_path / "processors-1.log")
    try:
        # Up and indexing (the child loads the model first): the corpus comes back indexed.
        corpus = [ingest_event(d) for d in documents()]
        await produce(s, t.docs_ingest, corpus)
        indexed = await collect(
            s, [t.docs_ingested], IngestResult, [e.request_id for e in corpus], timeout=300
        )
        assert all(r.status == "ok" for r in indexed.values())

        requests = [
            ChatRequest(
                tenant_id=rng.choice([ACME, GLOBEX]),
                question=rng.choice(QUESTIONS).text + f" ({i})",
                lane=rng.choice(["chat", "bulk"]),
            )
            for i in range(REQUESTS)
        ]
        docs = [
            DocumentIngest(
                tenant_id=ACME, doc_id=f"crash-{i}", content_type="text/markdown", text=HANDBOOK_MD
            )
            for i in range(DOCS_DURING_CRASH)
        ]
        await produce(s, t.docs_ingest, docs)
        for lane in ("chat", "bulk"):
            await produce(s, t.requests(lane), [r for r in requests if r.lane == lane])

        await wait_for(
            lambda: _at_least(s, enriched_topics, 40), timeout=300, interval=0.2, what="the first results"
        )
        kill(first)
    finally:
        if first.poll() is None:
            kill(first)
    at_kill = await committed_count(s, enriched_topics)
    log.info("killed with %d of %d requests enriched", at_kill, REQUESTS)
    assert at_kill < REQUESTS, "the processor finished before it was killed: nothing was proven"

    second = spawn(["processors", "run"], s, tmp_path / "processors-2.log")
    try:
        enriched = await collect(
            s, enriched_topics, EnrichedRequest, [r.request_id for r in requests], timeout=300
        )
        results = await collect(s, [t.docs_ingested], IngestResult, [d.request_id for d in docs], timeout=120)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGTERM)
        assert second.wait(timeout=60) == 0, (tmp_path / "processors-2.log").read_text()[-3000:]

    # Exactly once: `collect` fails on a second event for a request, and nothing else is there.
    assert await committed_count(s, enriched_topics) == REQUESTS
    for req in requests:
        out = enriched[req.request_id]
        assert out.request == req and out.chunks
    assert all(r.status == "ok" and r.chunks > 0 for r in results.values())
    ingested = [r for r in await read_topic(s, t.docs_ingested) if b"crash-" in r.value]
    assert len(ingested) == DOCS_DURING_CRASH

    # Milvus holds each document once: replayed writes landed on the same rows.
    store = ChunkStore(make_milvus_client(s), s.milvus_collection, dimension=384)
    try:
        store.ensure_collection()
        expected = next(iter(results.values())).chunks
        for d in docs:
            rows = store.chunks_of(ACME, d.doc_id)
            assert len(rows) == expected and {r["version"] for r in rows} == {d.event_id}
    finally:
        store.close()


async def _at_least(settings: Settings, topics: list[str], n: int) -> bool:
    return await committed_count(settings, topics) >= n


async def test_a_fenced_processor_stops_and_its_work_is_redone_once(
    settings: Settings, tmp_path: Path
) -> None:
    """A second processor with the same transactional id (a restarted one, while the old one
    still runs) fences the first: the old one can commit nothing more and stops with an error,
    and its partitions' requests come out once, from the member that takes them over."""
    s = settings
    twin = s.model_copy(update={"milvus_uri": str(tmp_path / "twin.db")})
    requests = [ChatRequest(tenant_id=ACME, question=f"question {i}", lane="chat") for i in range(200)]
    topics = [s.topics.enriched("chat")]
    _, old_task, old_stop = await start_processors(s)
    try:
        async with running_processors(twin):
            await produce(s, s.topics.requests("chat"), requests)
            ids = [r.request_id for r in requests]
            enriched = await collect(s, topics, EnrichedRequest, ids, timeout=180)
            with pytest.raises(ProcessorsError, match="fenced"):
                await asyncio.wait_for(old_task, 60)
    finally:
        old_stop.set()
        if not old_task.done():
            await asyncio.wait_for(old_task, 60)
    assert len(enriched) == len(requests)
    assert await committed_count(s, topics) == len(requests)
