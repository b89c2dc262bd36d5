"""Hostile documents never stop ingestion: inputs that made the old parsers take tens of seconds
(a 20,000-deep `<div>` nest, 8,000 `*a ` in a row) and a document that takes the parser longer
than the deadline go in first, a normal document right after; the normal one is indexed within
seconds, the slow one ends with parse_timeout (reply and dead letter), and the processors run on.
Real Kafka, real Milvus Lite, the real embedding model, real parser processes."""

from __future__ import annotations

import asyncio
import time

from infra.settings import Settings
from processors.ingest.stage import IngestStage
from schemas import DeadLetter, DocumentIngest, ErrorCode, IngestResult
from tests.helpers import read_events
from tests.integration.knowledge_corpus import ACME
from tests.integration.knowledge_support import collect, produce, start_processors

DEADLINE_S = 3.0


def slow_markdown() -> str:
    """~1 MB of Markdown table (5,000 columns by 100 rows) that markdown-it-py needs ~30 s for."""
    cols = 5000
    return "|a" * cols + "\n" + "|-" * cols + "\n" + ("|x" * cols + "\n") * 100


async def test_bombs_and_a_slow_document_do_not_hold_up_the_next_one(settings: Settings) -> None:
    s = settings.model_copy(update={"parse_timeout_s": DEADLINE_S, "parse_workers": 2})
    t = s.topics.tenant(ACME)

    def doc(doc_id: str, content_type: str, text: str) -> DocumentIngest:
        return DocumentIngest(tenant_id=ACME, doc_id=doc_id, content_type=content_type, text=text)  # type: ignore[arg-type]

    div_nest = doc("div-nest", "text/html", "<div>" * 20_000 + "deep text" + "</div>" * 20_000)
    stars = doc("stars", "text/markdown", "*a " * 8000)
    slow = doc("slow-table", "text/markdown", slow_markdown())
    normal = doc("normal", "text/markdown", "# Parking\n\nVisitors park on level 2 of the east garage.\n")
    bombs = [div_nest, stars]

    processors, task, stop = await start_processors(s)
    try:
        started = time.perf_counter()
        await produce(s, t.docs_ingest, [*bombs, slow])
        await produce(s, t.docs_ingest, [normal])
        first = await collect(s, [t.docs_ingested], IngestResult, [normal.request_id], timeout=60)
        normal_s = time.perf_counter() - started
        results = await collect(s, [t.docs_ingested], IngestResult, [d.request_id for d in [*bombs, slow]])
        results.update(first)
        assert not task.done(), "the processors stopped"
        ingest = processors.stages["ingest"]
        assert isinstance(ingest, IngestStage)
        assert ingest.parser.timeouts == 1
        for _ in range(300):  # the killed parser's replacement starts in the background
            if len(ingest.parser.pids) == s.parse_workers:
                break
            await asyncio.sleep(0.1)
        assert len(ingest.parser.pids) == s.parse_workers
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)

    print(
        f"normal document: IngestResult {normal_s:.1f} s after the bombs were produced "
        f"(total_ms {results[normal.request_id].timings.total_ms:.0f}, "
        f"parse_ms {results[normal.request_id].timings.parse_ms:.0f}, deadline {DEADLINE_S} s); "
        + ", ".join(
            f"{d.doc_id}: {results[d.request_id].status} parse_ms {results[d.request_id].timings.parse_ms}"
            for d in [*bombs, slow]
        )
    )
    done = results[normal.request_id]
    assert done.status == "ok" and done.chunks >= 1
    # Parsing never held the normal document up beyond the deadline (it waited for a free parser
    # at most); what its batch spends after that is embedding (the star document's 100 chunks).
    assert done.timings.parse_ms is not None and done.timings.parse_ms < (DEADLINE_S + 5) * 1000
    assert normal_s < 90
    for bomb in bombs:
        result = results[bomb.request_id]
        assert result.status == "ok" or (
            result.error is not None and result.error.message.startswith("parse_timeout")
        ), result
    timed_out = results[slow.request_id]
    assert timed_out.status == "error" and timed_out.error is not None
    assert timed_out.error.code == ErrorCode.INGEST_ERROR
    assert timed_out.error.message.startswith("parse_timeout: ")

    letters = await read_events(s, s.topics.dlq(t.docs_ingest), DeadLetter)
    by_request = {d.request_id: d for d in letters}
    assert by_request[slow.request_id].error_class == "parse_timeout"
    assert by_request[slow.request_id].stage == f"{s.topic_prefix}.processors.ingest"
    assert normal.request_id not in by_request
    for bomb in bombs:
        assert bomb.request_id not in by_request or by_request[bomb.request_id].error_class == "parse_timeout"
