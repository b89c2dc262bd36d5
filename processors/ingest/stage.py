"""Documents in, chunks in Milvus and an IngestResult out, for a micro-batch of DocumentIngest.

Every upsert of the batch is parsed in the parse pool's worker processes (all at once, each within
a deadline: processors/parse_pool.py) and chunked on a worker thread, all their chunks are embedded
together (at ingestion priority, so questions go first), and the Milvus writes are applied in the
order of the events, so an upsert followed by a delete of the same document ends deleted.
Replaying a batch after a crash rewrites the same rows (primary keys derive from the event).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from infra.kafka.codec import Encoded, Output, encode, salvage_envelope
from infra.kafka.dlq import rejection_reason, routable
from infra.kafka.publisher import TransactionalPublisher
from infra.settings import Settings
from processors.chunking import Chunk, Chunker
from processors.embedding import Embedder, Priority
from processors.parse_pool import ParsePool, ParseTimeout
from processors.parsing import ParsedDocument, ParseError
from processors.records import RecordView
from processors.stage import BatchStage, Incoming, Result
from processors.store import ChunkRow, ChunkStore, DocumentMeta
from schemas import DocumentIngest, ErrorCode, ErrorInfo, IngestResult, limits
from schemas.events import IngestTimings

log = logging.getLogger(__name__)


class IngestFailed(RuntimeError):
    """The document could not be indexed (unreadable content, or the model or Milvus failed).

    `error_class` goes into the dead letter: `processing`, or why parsing gave up on a hostile
    document (`parse_timeout`, `too_large`)."""

    def __init__(self, message: str, *, error_class: str = "processing") -> None:
        super().__init__(message)
        self.error_class = error_class


@dataclass
class _Parsed:
    title: str | None
    chunks: list[Chunk]
    parse_ms: float
    chunk_ms: float


@dataclass
class _Embedded:
    started: float  # time.perf_counter() when the batch was picked up
    docs: list[_Parsed | BaseException | None]  # per event: chunks, why not, or None (a delete)
    vectors: np.ndarray | None
    error: BaseException | None
    embed_ms: float
    chunks: int


class IngestStage(BatchStage[DocumentIngest]):
    model = DocumentIngest

    def __init__(
        self,
        settings: Settings,
        publisher: TransactionalPublisher,
        embedder: Embedder,
        store: ChunkStore,
    ) -> None:
        super().__init__(settings, publisher, name="ingest")
        self.embedder = embedder
        self.store = store
        self.chunker = Chunker(
            min(settings.chunk_tokens, embedder.max_tokens),
            min(settings.chunk_overlap_tokens, min(settings.chunk_tokens, embedder.max_tokens) // 2),
        )
        self.results_topic = settings.topics.docs_ingested
        self.parser = ParsePool(
            workers=settings.parse_workers,
            timeout_s=settings.parse_timeout_s,
            memory_mb=settings.parse_memory_mb,
            max_text_chars=settings.parse_max_text_chars,
        )

    async def close(self) -> None:
        """Stop the parser processes."""
        await self.parser.close()

    async def parse(self, doc: DocumentIngest) -> tuple[ParsedDocument, float] | IngestFailed:
        """One document's text in a parser process (and how long it took, ms), or why not."""
        started = time.perf_counter()
        try:
            parsed = await self.parser.parse(doc)
        except (ParseTimeout, ParseError) as e:
            return IngestFailed(str(e), error_class=getattr(e, "error_class", "processing"))
        except Exception as e:
            log.exception("%s: parsing %s failed", self.name, doc.doc_id)
            return IngestFailed(f"parsing failed: {type(e).__name__}: {e}")
        return parsed, _ms(started)

    def chunk(self, parsed: ParsedDocument, parse_ms: float) -> _Parsed:
        """Chunk one parsed document (blocking: runs on a worker thread, the tokenizer's one)."""
        started = time.perf_counter()
        chunks = self.chunker.split(parsed.text, self.embedder.token_spans)
        if not chunks:
            raise ParseError("the document has no text to index")
        return _Parsed(parsed.title, chunks, parse_ms, _ms(started))

    async def prepare(self, batch: list[Incoming[DocumentIngest]]) -> _Embedded:
        """Parse every upsert (all at once, in the parser processes), chunk them (worker thread),
        embed all their chunks together."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        upserts = [item.event for item in batch if item.event.op != "delete"]
        parsed = iter(await asyncio.gather(*(self.parse(doc) for doc in upserts)))
        prepared: list[_Parsed | BaseException | None] = []
        for item in batch:
            if item.event.op == "delete":
                prepared.append(None)
                continue
            result = next(parsed)
            if isinstance(result, BaseException):
                prepared.append(result)
                continue
            try:
                prepared.append(await loop.run_in_executor(None, self.chunk, *result))
            except ParseError as e:
                prepared.append(IngestFailed(str(e)))
            except Exception as e:
                log.exception("%s: chunking %s failed", self.name, item.event.doc_id)
                prepared.append(IngestFailed(f"chunking failed: {type(e).__name__}: {e}"))

        texts = [c.text for p in prepared if isinstance(p, _Parsed) for c in p.chunks]
        embed_started = time.perf_counter()
        try:
            vectors = await self.embedder.encode(texts, priority=Priority.INGEST)
            embed_error: BaseException | None = None
        except Exception as e:
            log.exception("%s: embedding %d chunks failed", self.name, len(texts))
            vectors, embed_error = None, IngestFailed(f"embedding failed: {type(e).__name__}: {e}")
        embed_ms = (time.perf_counter() - embed_started) * 1000
        return _Embedded(started, prepared, vectors, embed_error, embed_ms, len(texts))

    async def finish(self, batch: list[Incoming[DocumentIngest]], embedded: _Embedded) -> list[Result]:
        """Apply the Milvus writes in event order and build each document's IngestResult."""
        started, vectors, embed_error = embedded.started, embedded.vectors, embedded.error
        results: list[Result] = []
        row = 0
        for item, prep in zip(batch, embedded.docs, strict=True):
            doc = item.event
            if isinstance(prep, BaseException):
                results.append(prep)
                continue
            stale = self.publisher.stale_reason(item.record)
            if stale is not None:
                # A rebalance overtook this batch: the partition's next owner indexes the document
                # again; writing now could put an older version back over a newer one.
                log.warning("%s: not writing %s/%s (%s)", self.name, doc.tenant_id, doc.doc_id, stale)
                if isinstance(prep, _Parsed):
                    row += len(prep.chunks)
                results.append([])
                continue
            op_started = time.perf_counter()
            try:
                if prep is None:
                    removed = await self.store.call(self.store.delete_document, doc.tenant_id, doc.doc_id)
                    log.info("%s: deleted %s/%s (%d chunks)", self.name, doc.tenant_id, doc.doc_id, removed)
                    timings = IngestTimings(upsert_ms=_ms(op_started))
                    results.append([self._result(doc, "ok", 0, timings, started)])
                    continue
                if embed_error is not None or vectors is None:
                    results.append(embed_error or IngestFailed("no vectors"))
                    row += len(prep.chunks)
                    continue
                rows = [ChunkRow(c.index, c.text, vectors[row + k]) for k, c in enumerate(prep.chunks)]
                row += len(prep.chunks)
                meta = DocumentMeta(
                    tenant_id=doc.tenant_id,
                    doc_id=doc.doc_id,
                    version=doc.event_id,
                    source=doc.source,
                    title=prep.title,
                    content_type=doc.content_type,
                    metadata=dict(doc.metadata),
                )
                replaced = await self.store.call(self.store.replace_document, meta, rows)
            except Exception as e:
                log.exception("%s: writing %s/%s failed", self.name, doc.tenant_id, doc.doc_id)
                results.append(IngestFailed(f"vector store failed: {type(e).__name__}: {e}"))
                continue
            share = len(rows) / max(1, embedded.chunks)
            timings = IngestTimings(
                parse_ms=prep.parse_ms,
                chunk_ms=prep.chunk_ms,
                embed_ms=embedded.embed_ms * share,
                upsert_ms=_ms(op_started),
            )
            log.info(
                "%s: indexed %s/%s: %d chunks (%d of an older version removed)",
                self.name,
                doc.tenant_id,
                doc.doc_id,
                len(rows),
                replaced,
            )
            results.append([self._result(doc, "ok", len(rows), timings, started)])
        return results

    def _result(
        self,
        doc: DocumentIngest,
        status: str,
        chunks: int,
        timings: IngestTimings,
        started: float,
        error: ErrorInfo | None = None,
    ) -> Output:
        timings.total_ms = _ms(started)
        result = IngestResult(
            **doc.envelope(),
            doc_id=doc.doc_id,
            op=doc.op,
            status=status,  # type: ignore[arg-type]
            chunks=chunks,
            timings=timings,
            error=error,
        )
        return self.results_topic, encode(result)

    def reject(self, record: RecordView, error: BaseException, event: DocumentIngest | None) -> list[Output]:
        out = [self.dead_letter(record, error)]
        if event is not None:
            info = ErrorInfo(
                code=ErrorCode.INGEST_ERROR, message=limits.cut(str(error), 2000) or type(error).__name__
            )
            out.append(self._result(event, "error", 0, IngestTimings(), time.perf_counter(), info))
            return out
        salvaged = _salvage_result(record, error)
        if salvaged is not None:
            out.append((self.results_topic, salvaged))
        return out


def _salvage_result(record: RecordView, error: BaseException) -> Encoded | None:
    """An error IngestResult for an undecodable DocumentIngest whose bytes still name one."""
    env = salvage_envelope(record.value)
    doc_id, op = _doc_fields(record.value)
    if not routable(env) or doc_id is None:
        return None
    try:
        result = IngestResult(
            request_id=env["request_id"],
            tenant_id=env["tenant_id"],
            user_id=env.get("user_id", "anonymous"),
            doc_id=doc_id,
            op=op,
            status="error",
            error=ErrorInfo(
                code=ErrorCode.INVALID_REQUEST,
                message=limits.cut(f"the document was rejected {rejection_reason(error)}", 2000),
            ),
        )
    except ValueError:
        return None
    return encode(result)


def _doc_fields(value: bytes | None) -> tuple[str | None, Literal["upsert", "delete"]]:
    """doc_id and op of undecodable bytes, when they are there."""
    if not value or len(value) > 64 * 1024 * 1024:
        return None, "upsert"
    try:
        obj = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, "upsert"
    if not isinstance(obj, dict):
        return None, "upsert"
    doc_id = obj.get("doc_id")
    op: Literal["upsert", "delete"] = "delete" if obj.get("op") == "delete" else "upsert"
    return (doc_id if isinstance(doc_id, str) and 0 < len(doc_id) <= limits.DOC_ID_MAX else None), op


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000
