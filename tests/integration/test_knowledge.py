"""Documents in through `docs.ingest`, questions in through `<lane>.requests`, and what comes out:
the right chunks for the right tenant only, replaced and deleted documents gone, bad input in the
DLQ with a reply. Real Kafka, real Milvus Lite, the real embedding model."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import timedelta

import pytest

from infra.kafka.topics import declare_topics
from infra.settings import Settings
from processors.service import Processors, ProcessorsError
from schemas import (
    ChatRequest,
    ChatResponse,
    DeadLetter,
    DocumentIngest,
    EnrichedRequest,
    ErrorCode,
    IngestResult,
    RetrievalOptions,
)
from schemas.base import utcnow
from tests.helpers import read_events, read_topic, wait_for
from tests.integration.knowledge_corpus import ACME, GLOBEX, QUESTIONS, documents
from tests.integration.knowledge_support import (
    ask,
    collect,
    corpus_requests,
    found_answer,
    ingest,
    ingest_event,
    produce,
    running_processors,
    shared_model,
    tenants_texts,
)

#: The corpus's second tenant and one without documents (conftest declares acme's topics).
EXTRA_TENANTS = (GLOBEX, "initech")


@pytest.fixture
async def knowledge_settings(settings: Settings) -> Settings:
    # Small chunks: the 3 documents of acme make 17 chunks, so "in the top 3" means something.
    await declare_topics(settings, tenants=EXTRA_TENANTS)
    return settings.model_copy(update={"chunk_tokens": 64, "chunk_overlap_tokens": 16})


async def test_questions_get_the_right_chunk_and_tenants_never_mix(knowledge_settings: Settings) -> None:
    s = knowledge_settings
    docs = documents()
    async with running_processors(s) as processors:
        results = await ingest(s, [ingest_event(d) for d in docs])
        for doc, result in zip(docs, results.values(), strict=True):
            assert result.status == "ok", result.error
            assert result.doc_id == doc.doc_id and result.tenant_id == doc.tenant and result.chunks >= 1
            assert result.timings.embed_ms is not None and result.timings.total_ms is not None
        store = processors.store
        assert store is not None
        own = tenants_texts(store, docs)

        # Every question finds a chunk of the right document holding the answer in its top 3,
        # on either lane, dense or hybrid.
        asked = corpus_requests()
        enriched = await ask(s, [req for req, _ in asked])
        for req, q in asked:
            out = enriched[req.request_id]
            assert out.request == req and out.tenant_id == req.tenant_id and not out.no_context
            assert len(out.chunks) == min(3, len(own[q.tenant]))
            found_answer(out, q)
            assert out.timings.embed_ms is not None and out.timings.search_ms is not None
            assert out.timings.retrieval_batch_ms is not None and out.timings.retrieval_queue_ms is not None

        # 200 random questions for random tenants: every chunk comes from the asker's documents.
        rng = random.Random(7)
        vocabulary = " ".join(q.text for q in QUESTIONS).split()
        random_requests = []
        for _ in range(200):
            text = (
                rng.choice(QUESTIONS).text
                if rng.random() < 0.5
                else " ".join(rng.choice(vocabulary) for _ in range(rng.randint(2, 9)))
            )
            random_requests.append(
                ChatRequest(
                    tenant_id=rng.choice([ACME, GLOBEX]),
                    question=text,
                    lane=rng.choice(["chat", "bulk"]),
                    retrieval=RetrievalOptions(top_k=rng.choice([1, 4, 10, 20]), hybrid=rng.random() < 0.3),
                )
            )
        answered = await ask(s, random_requests)
        for req in random_requests:
            out = answered[req.request_id]
            assert out.chunks, req.question
            assert all(c.text in own[req.tenant_id] for c in out.chunks), (
                f"{req.tenant_id} got another tenant's chunk"
            )

        # A tenant without documents gets an empty context and the flag, not an error.
        nobody = ChatRequest(tenant_id="initech", question="How many days of annual leave do employees get?")
        out = (await ask(s, [nobody]))[nobody.request_id]
        assert out.chunks == [] and out.no_context

    # Outputs are keyed like the request and went to the lane of the topic they came from.
    records = await read_topic(s, s.topics.enriched("bulk"))
    assert records and all(json.loads(r.value)["request"]["lane"] == "bulk" for r in records)
    assert all(r.key == json.loads(r.value)["request_id"].encode() for r in records)


async def test_reingest_replaces_every_chunk_and_delete_removes_the_document(
    knowledge_settings: Settings,
) -> None:
    s = knowledge_settings
    old = " ".join(
        f"Paragraph {i}: the office cat is named Biscuit and sleeps on the radiator near desk {i}."
        for i in range(30)
    )
    new = "The office cat is now named Pepper. Pepper sleeps in the meeting room."
    question = ChatRequest(
        tenant_id=ACME, question="What is the office cat called?", retrieval=RetrievalOptions(top_k=50)
    )
    async with running_processors(s) as processors:
        store = processors.store
        assert store is not None
        first = await ingest(s, [DocumentIngest(tenant_id=ACME, doc_id="cat", text=old)])
        assert next(iter(first.values())).chunks > 5
        other = await ingest(s, [ingest_event(documents()[0])])  # another acme document stays put
        assert next(iter(other.values())).status == "ok"
        before = (await ask(s, [question]))[question.request_id]
        assert any("Biscuit" in c.text for c in before.chunks)

        changed = DocumentIngest(tenant_id=ACME, doc_id="cat", content_type="text/markdown", text=new)
        result = (await ingest(s, [changed]))[changed.request_id]
        assert result.status == "ok" and result.chunks == 1
        rows = await store.call(store.chunks_of, ACME, "cat")
        assert [r["version"] for r in rows] == [changed.event_id]
        again = question.model_copy(update={"request_id": "after-reingest", "event_id": "e-after-reingest"})
        after = (await ask(s, [again]))[again.request_id]
        assert not any("Biscuit" in c.text for c in after.chunks)
        assert [c.text for c in after.chunks if c.doc_id == "cat"] == [new]

        delete = DocumentIngest(tenant_id=ACME, doc_id="cat", op="delete")
        gone = (await ingest(s, [delete]))[delete.request_id]
        assert gone.status == "ok" and gone.op == "delete"
        assert await store.call(store.count, ACME, "cat") == 0
        assert await store.call(store.count, ACME, "policies") > 0
        last = question.model_copy(update={"request_id": "after-delete", "event_id": "e-after-delete"})
        final = (await ask(s, [last]))[last.request_id]
        assert final.chunks and all(c.doc_id == "policies" for c in final.chunks)


async def test_bad_input_goes_to_the_dlq_and_the_requester_is_told(knowledge_settings: Settings) -> None:
    s = knowledge_settings
    t = s.topics
    acme = t.tenant(ACME)
    bad_request = json.dumps(
        {"request_id": "r-bad", "tenant_id": ACME, "lane": "chat", "question": ""}
    ).encode()
    expired = ChatRequest(tenant_id=ACME, question="late?", deadline=utcnow() - timedelta(seconds=1))
    no_retrieval = ChatRequest(tenant_id=ACME, question="hi", retrieval=RetrievalOptions(enabled=False))
    fine = ChatRequest(tenant_id=ACME, question="How long are backups kept?")
    broken_pdf = DocumentIngest(
        tenant_id=ACME, doc_id="broken.pdf", content_type="application/pdf", data=b"%PDF-1.7 garbage"
    )
    bad_doc = json.dumps({"request_id": "d-bad", "tenant_id": ACME, "doc_id": "x", "op": "upsert"}).encode()
    async with running_processors(s):
        security = ingest_event(documents()[1])
        await produce(s, acme.docs_ingest, [broken_pdf, bad_doc, security])
        ids = [broken_pdf.request_id, "d-bad", security.request_id]
        results = await collect(s, [acme.docs_ingested], IngestResult, ids)
        await produce(
            s, acme.requests("chat"), [b"not json at all", bad_request, expired, no_retrieval, fine]
        )
        responses = await collect(s, [acme.responses("chat")], ChatResponse, ["r-bad", expired.request_id])
        enriched = await collect(
            s, [t.enriched("chat")], EnrichedRequest, [no_retrieval.request_id, fine.request_id]
        )

    rejected = responses["r-bad"]
    assert rejected.error is not None and rejected.error.code == ErrorCode.INVALID_REQUEST
    assert "question" in rejected.error.message and rejected.finish_reason == "error"
    late = responses[expired.request_id]
    assert late.error is not None and late.error.code == ErrorCode.DEADLINE_EXCEEDED
    assert enriched[no_retrieval.request_id].no_context and not enriched[no_retrieval.request_id].chunks
    assert any("35 days" in c.text for c in enriched[fine.request_id].chunks)

    assert results[security.request_id].status == "ok"
    assert results[broken_pdf.request_id].status == "error"
    assert results[broken_pdf.request_id].error.code == ErrorCode.INGEST_ERROR  # type: ignore[union-attr]
    assert "PDF" in results[broken_pdf.request_id].error.message  # type: ignore[union-attr]
    assert results["d-bad"].status == "error" and results["d-bad"].doc_id == "x"

    letters = await read_events(s, t.dlq(acme.requests("chat")), DeadLetter)
    assert sorted(d.error_class for d in letters) == ["not_json", "schema_validation"]
    assert {d.stage for d in letters} == {f"{s.topic_prefix}.processors.retrieval-chat"}
    doc_letters = await read_events(s, t.dlq(acme.docs_ingest), DeadLetter)
    assert sorted(d.error_class for d in doc_letters) == ["processing", "schema_validation"]
    assert {d.request_id for d in doc_letters} == {broken_pdf.request_id, "d-bad"}


async def test_a_failing_vector_store_answers_with_retrieval_error(knowledge_settings: Settings) -> None:
    s = knowledge_settings
    async with running_processors(s) as processors:
        store = processors.store
        assert store is not None
        await store.call(store.client.drop_collection, store.collection)  # Milvus now fails every search
        doomed = ChatRequest(tenant_id=ACME, question="How long are backups kept?", lane="bulk", job_id="j1")
        await produce(s, s.topics.tenant(ACME).requests("bulk"), [doomed])
        got = await collect(s, [s.topics.tenant(ACME).responses("bulk")], ChatResponse, [doomed.request_id])
    response = got[doomed.request_id]
    assert response.error is not None and response.error.code == ErrorCode.RETRIEVAL_ERROR
    assert response.job_id == "j1" and response.lane == "bulk"
    letters = await read_events(s, s.topics.dlq_of("bulk.requests"), DeadLetter)
    assert [d.request_id for d in letters] == [doomed.request_id]
    assert letters[0].error_class == "processing"
    assert await read_events(s, s.topics.enriched("bulk"), EnrichedRequest) == []


async def test_a_second_processor_on_the_same_lite_file_refuses_to_start(
    knowledge_settings: Settings,
) -> None:
    async with running_processors(knowledge_settings):
        second = Processors(knowledge_settings, model=shared_model())
        with pytest.raises(ProcessorsError, match=r"in use by pid \d+"):
            await second.run(asyncio.Event())


async def test_a_payload_claiming_another_tenant_is_dead_lettered_and_never_reaches_its_data(
    knowledge_settings: Settings,
) -> None:
    """The tenant of a request is the topic it came in on: acme writing `tenant_id: globex` on its
    own topics gets a `tenant_mismatch` rejection, never globex's chunks, and cannot delete
    globex's document; globex hears nothing of it."""
    s = knowledge_settings
    t = s.topics
    acme, globex = t.tenant(ACME), t.tenant(GLOBEX)
    globex_doc = next(d for d in documents() if d.tenant == GLOBEX)
    forged_question = ChatRequest(tenant_id=GLOBEX, question="What is the hotel budget per night?")
    forged_delete = DocumentIngest(tenant_id=GLOBEX, doc_id=globex_doc.doc_id, op="delete")
    honest = ChatRequest(tenant_id=GLOBEX, question="What is the hotel budget per night?")
    async with running_processors(s) as processors:
        store = processors.store
        assert store is not None
        await ingest(s, [ingest_event(globex_doc)])
        await produce(s, acme.requests("chat"), [forged_question])
        await produce(s, acme.docs_ingest, [forged_delete])
        replies = await collect(s, [acme.responses("chat")], ChatResponse, [forged_question.request_id])
        results = await collect(s, [acme.docs_ingested], IngestResult, [forged_delete.request_id])
        # globex itself still gets its own chunks, and its document is still there
        answered = await ask(s, [honest])
        assert await store.call(store.count, GLOBEX, globex_doc.doc_id) > 0

    reply = replies[forged_question.request_id]
    assert reply.tenant_id == ACME and reply.error is not None
    assert reply.error.code == ErrorCode.INVALID_REQUEST and "tenant_mismatch" in reply.error.message
    result = results[forged_delete.request_id]
    assert result.tenant_id == ACME and result.status == "error"
    assert any("180 dollars" in c.text for c in answered[honest.request_id].chunks)

    enriched = await read_events(s, t.enriched("chat"), EnrichedRequest)
    assert forged_question.request_id not in {e.request_id for e in enriched}
    for topic in (globex.responses("chat"), globex.docs_ingested):
        assert not [r for r in await read_topic(s, topic) if forged_question.request_id.encode() in r.value]
        assert not [r for r in await read_topic(s, topic) if forged_delete.request_id.encode() in r.value]
    letters = await read_events(s, t.dlq_of("chat.requests"), DeadLetter)
    assert [(d.request_id, d.error_class, d.tenant_id) for d in letters] == [
        (forged_question.request_id, "tenant_mismatch", ACME)
    ]
    doc_letters = await read_events(s, t.dlq_of("docs.ingest"), DeadLetter)
    assert [(d.request_id, d.error_class) for d in doc_letters] == [
        (forged_delete.request_id, "tenant_mismatch")
    ]


async def test_a_tenant_added_while_the_processors_run_is_served(knowledge_settings: Settings) -> None:
    """`ragbus tenants add` creates topics while the processors run: they pick them up (no restart)
    and keep serving the tenants they had."""
    s = knowledge_settings.model_copy(update={"tenant_refresh_s": 1.0})
    newco = s.topics.tenant("newco")
    doc = DocumentIngest(
        tenant_id="newco",
        doc_id="parking",
        text="Newco parking rules: the visitor car park is level minus two, gate code 7731.",
    )
    question = ChatRequest(tenant_id="newco", question="What is the gate code of the visitor car park?")
    before = ChatRequest(tenant_id=ACME, question="How long are backups kept?")
    async with running_processors(s) as processors:
        assert newco.docs_ingest not in processors.input_topics
        await declare_topics(s, tenants=["newco"])

        async def picked_up() -> bool:
            return newco.requests("chat") in processors.input_topics

        await wait_for(picked_up, timeout=30, what="the processors to read newco's topics")
        result = (await ingest(s, [doc]))[doc.request_id]
        assert result.status == "ok" and result.tenant_id == "newco" and result.chunks == 1
        enriched = await ask(s, [question, before])
    out = enriched[question.request_id]
    assert out.tenant_id == "newco" and [c.doc_id for c in out.chunks] == ["parking"]
    assert "7731" in out.chunks[0].text
    assert enriched[before.request_id].tenant_id == ACME
