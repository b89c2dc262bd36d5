"""The processors against a real Milvus server (tests/provision.py: RAGBUS_TEST_MILVUS_URI, else
Docker, else the local standalone server of infra/milvus_server.py) instead of Milvus Lite: documents
in through `docs.ingest`, questions through the lanes, the right chunks for the right tenant out;
re-ingest and delete. Milvus 2.3 has no BM25 function: the collection is dense-only, hybrid
requests are answered by dense search, and the processors say so once."""

from __future__ import annotations

import logging

import pytest
from pymilvus import MilvusClient

from infra.kafka.topics import declare_topics
from infra.settings import Settings
from processors.store import BM25_SINCE, quote, server_at_least
from schemas import DocumentIngest
from tests.integration.knowledge_corpus import ACME, GLOBEX, documents
from tests.integration.knowledge_support import (
    ask,
    corpus_requests,
    found_answer,
    ingest,
    ingest_event,
    running_processors,
    tenants_texts,
)
from tests.provision import MilvusService


@pytest.fixture
async def server_settings(settings: Settings, milvus_server: MilvusService) -> Settings:
    """The test's settings on the session's Milvus server, with a collection of the test's own."""
    await declare_topics(settings, tenants=(GLOBEX,))
    return settings.model_copy(
        update={"milvus_uri": milvus_server.uri, "chunk_tokens": 64, "chunk_overlap_tokens": 16}
    )


async def test_processors_ingest_and_retrieve_on_a_milvus_server(
    server_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    s = server_settings
    assert not s.uses_milvus_lite
    docs = documents()
    caplog.set_level(logging.WARNING, logger="processors.store")
    async with running_processors(s) as processors:
        store = processors.store
        assert store is not None
        version = str(store.client.get_server_version())
        keyword = server_at_least(version, BM25_SINCE)
        assert store.keyword_search is keyword
        no_bm25 = [r for r in caplog.records if "no BM25 function" in r.getMessage()]
        assert len(no_bm25) == (0 if keyword else 1), [r.getMessage() for r in no_bm25]

        results = await ingest(s, [ingest_event(d) for d in docs])
        for doc, result in zip(docs, results.values(), strict=True):
            assert result.status == "ok", result.error
            assert result.doc_id == doc.doc_id and result.chunks >= 1
        own = tenants_texts(store, docs)

        # Every question finds a chunk of the right document holding the answer in its top 3, dense
        # and hybrid (dense search on a server without BM25).
        asked = corpus_requests()
        enriched = await ask(s, [req for req, _ in asked])
        for req, q in asked:
            out = enriched[req.request_id]
            assert out.tenant_id == req.tenant_id and not out.no_context
            assert all(c.text in own[q.tenant] for c in out.chunks), "another tenant's chunk"
            found_answer(out, q)

        # Re-ingest replaces every chunk of a document; delete removes it.
        cat = DocumentIngest(tenant_id=ACME, doc_id="cat", text="The office cat is named Biscuit. " * 40)
        assert (await ingest(s, [cat]))[cat.request_id].chunks > 1
        renamed = DocumentIngest(tenant_id=ACME, doc_id="cat", text="The office cat is now named Pepper.")
        assert (await ingest(s, [renamed]))[renamed.request_id].chunks == 1
        rows = await store.call(store.chunks_of, ACME, "cat")
        assert [(r["version"], r["text"]) for r in rows] == [(renamed.event_id, renamed.text)]
        delete = DocumentIngest(tenant_id=ACME, doc_id="cat", op="delete")
        assert (await ingest(s, [delete]))[delete.request_id].status == "ok"
        assert await store.call(store.count, ACME, "cat") == 0

    # The chunks live in the server, not in the processors: another client sees them.
    other = MilvusClient(uri=s.milvus_target)
    try:
        rows = other.query(
            s.milvus_collection,
            filter=f"tenant_id == {quote(GLOBEX)}",
            output_fields=["count(*)"],
            consistency_level="Strong",
        )
        assert int(rows[0]["count(*)"]) == len(own[GLOBEX])
    finally:
        other.close()
