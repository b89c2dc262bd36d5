"""Questions in, questions with their context out: one lane's micro-batch of ChatRequests.

All questions of a micro-batch are embedded in one model call (`prepare`). Milvus applies one
filter to a whole search call, so the batch is searched with one batched call per (tenant,
hybrid) group — one call for the whole batch when the questions share a tenant (`finish`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from infra.kafka.codec import DecodeError, Output, encode
from infra.kafka.dlq import rejection_response
from infra.kafka.publisher import TransactionalPublisher
from infra.settings import Settings
from infra.telemetry import span_from_headers, tracing_enabled
from processors.embedding import Embedder, Priority
from processors.records import RecordView
from processors.stage import BatchStage, Incoming, Result
from processors.store import ChunkStore, Hit
from schemas import (
    ChatRequest,
    ChatResponse,
    EnrichedRequest,
    ErrorCode,
    ErrorInfo,
    Lane,
    RetrievedChunk,
    StageTimings,
)
from schemas.base import utcnow

log = logging.getLogger(__name__)


class RetrievalFailed(RuntimeError):
    """Embedding or the vector search failed for a valid request."""


@dataclass(frozen=True)
class _Query:
    position: int
    request: ChatRequest
    top_k: int
    hybrid: bool


@dataclass
class _Prepared:
    started: float  # time.monotonic() when the batch was picked up
    picked_up: datetime
    queries: list[_Query] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)
    no_retrieval: list[int] = field(default_factory=list)
    vectors: np.ndarray | None = None
    embed_ms: float = 0.0
    failure: RetrievalFailed | None = None


class RetrievalStage(BatchStage[ChatRequest]):
    model = ChatRequest

    def __init__(
        self,
        settings: Settings,
        publisher: TransactionalPublisher,
        embedder: Embedder,
        store: ChunkStore,
        *,
        lane: Lane,
    ) -> None:
        super().__init__(settings, publisher, name=f"retrieval-{lane}")
        self.lane = lane
        self.embedder = embedder
        self.store = store
        self.priority = Priority.CHAT if lane == "chat" else Priority.BULK
        self.enriched_topic = settings.topics.enriched(lane)
        self.responses_topic = settings.topics.responses(lane)

    async def prepare(self, batch: list[Incoming[ChatRequest]]) -> _Prepared:
        """Sort the batch out and embed its questions (one model call)."""
        prep = _Prepared(started=time.monotonic(), picked_up=utcnow())
        for i, item in enumerate(batch):
            req = item.event
            if req.expired(prep.picked_up):
                prep.expired.append(i)
            elif not req.retrieval.enabled:
                prep.no_retrieval.append(i)
            else:
                top_k = req.retrieval.top_k or self.settings.retrieval_top_k
                hybrid = (
                    self.settings.retrieval_hybrid if req.retrieval.hybrid is None else req.retrieval.hybrid
                )
                prep.queries.append(_Query(i, req, top_k, hybrid))
        if prep.queries:
            embed_started = time.perf_counter()
            try:
                prep.vectors = await self.embedder.encode(
                    [q.request.question for q in prep.queries], priority=self.priority
                )
            except Exception as e:
                log.exception("%s: embedding %d questions failed", self.name, len(prep.queries))
                prep.failure = RetrievalFailed(f"embedding failed: {type(e).__name__}: {e}")
            prep.embed_ms = (time.perf_counter() - embed_started) * 1000
        return prep

    async def finish(self, batch: list[Incoming[ChatRequest]], prep: _Prepared) -> list[Result]:
        """Search Milvus (one batched call per tenant) and build each request's output."""
        results: list[Result] = [RuntimeError("not processed")] * len(batch)
        for i in prep.expired:
            results[i] = [self._deadline_response(batch[i].event)]
        for i in prep.no_retrieval:
            results[i] = [self._enriched(batch[i], [], self._timings(batch[i], prep))]
        queries, vectors = prep.queries, prep.vectors
        if prep.failure is not None or vectors is None:
            for q in queries:
                results[q.position] = prep.failure or RetrievalFailed("no embedding")
            return results

        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
        for row, q in enumerate(queries):
            groups[(q.request.tenant_id, q.hybrid)].append(row)
        for (tenant, hybrid), rows in groups.items():
            limit = max(queries[r].top_k for r in rows)
            search_started = time.perf_counter()
            try:
                found = await self.store.call(
                    self.store.search,
                    tenant,
                    vectors[np.asarray(rows)],
                    limit,
                    texts=[queries[r].request.question for r in rows],
                    hybrid=hybrid,
                )
            except Exception as e:
                log.exception("%s: search for tenant %s failed", self.name, tenant)
                for r in rows:
                    results[queries[r].position] = RetrievalFailed(f"search failed: {type(e).__name__}: {e}")
                continue
            search_ms = (time.perf_counter() - search_started) * 1000
            for r, hits in zip(rows, found, strict=True):
                q = queries[r]
                item = batch[q.position]
                timings = self._timings(item, prep, embed_ms=prep.embed_ms, search_ms=search_ms)
                results[q.position] = [self._enriched(item, hits[: q.top_k], timings)]
        return results

    def _timings(
        self,
        item: Incoming[ChatRequest],
        prep: _Prepared,
        *,
        embed_ms: float | None = None,
        search_ms: float | None = None,
    ) -> StageTimings:
        received = item.record.received
        return StageTimings(
            retrieval_queue_ms=max(0.0, (prep.picked_up - item.event.created_at).total_seconds() * 1000),
            retrieval_batch_ms=max(0.0, (prep.started - received) * 1000) if received else None,
            embed_ms=embed_ms,
            search_ms=search_ms,
        )

    def _enriched(self, item: Incoming[ChatRequest], hits: list[Hit], timings: StageTimings) -> Output:
        req = item.event
        chunks = [
            RetrievedChunk(
                chunk_id=h.chunk_id,
                doc_id=h.doc_id,
                text=h.text,
                score=h.score,
                source=h.source,
                title=h.title,
            )
            for h in hits
        ]
        enriched = EnrichedRequest(
            **req.envelope(), request=req, chunks=chunks, no_context=not chunks, timings=timings
        )
        key = item.record.key_text or req.request_id
        if not tracing_enabled():
            return self.enriched_topic, encode(enriched, key=key)
        with span_from_headers(
            "retrieval",
            item.record.headers,
            component="processors",
            **{
                "ragbus.request_id": req.request_id,
                "ragbus.tenant_id": req.tenant_id,
                "ragbus.chunks": len(chunks),
            },
        ):
            return self.enriched_topic, encode(enriched, key=key)

    def _deadline_response(self, req: ChatRequest) -> Output:
        return self.responses_topic, encode(
            self._error_response(req, ErrorCode.DEADLINE_EXCEEDED, "the deadline passed before retrieval")
        )

    def _error_response(self, req: ChatRequest, code: ErrorCode, message: str) -> ChatResponse:
        return ChatResponse(
            **req.envelope(),
            finish_reason="error",
            error=ErrorInfo(code=code, message=message[:2000]),
            conversation_id=req.conversation_id,
            job_id=req.job_id,
            custom_id=req.custom_id,
        )

    def reject(self, record: RecordView, error: BaseException, event: ChatRequest | None) -> list[Output]:
        out = [self.dead_letter(record, error)]
        if event is None:
            code = ErrorCode.INVALID_REQUEST if isinstance(error, DecodeError) else ErrorCode.INTERNAL_ERROR
            response = rejection_response(record, error, topics=self.settings.topics, code=code)
            if response is not None:
                out.append(response)
            return out
        if isinstance(error, RetrievalFailed):
            code, message = ErrorCode.RETRIEVAL_ERROR, f"retrieval failed: {error}"
        else:
            code, message = (
                ErrorCode.INTERNAL_ERROR,
                f"the retrieval processor failed: {type(error).__name__}",
            )
        out.append((self.responses_topic, encode(self._error_response(event, code, message))))
        return out
