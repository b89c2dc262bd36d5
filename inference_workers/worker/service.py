"""The inference worker: enriched requests in, micro-batched generation, answers out, exactly once.

Three tasks share one event loop:
- polling (`Intake`): fetches both lanes, pauses partitions at the in-flight limit, and keeps the
  consumer's heartbeat and poll clock alive while a batch generates;
- batching: takes up to `llm_max_batch` requests (chat first, topped up from bulk) once the batch is
  full or `llm_max_wait_ms` passed, routes each to its model, and generates the engines' batches
  concurrently (each engine on its own thread or process);
- token streaming: TokenChunk events for `stream=true` requests, as tokens arrive (not
  transactional: the final ChatResponse is authoritative and clients skip repeated indexes).

Each finished batch is published in one Kafka transaction — responses, dead letters and the
consumed offsets — through the same `TransactionalPublisher` the processors use (one policy for
fencing, aborts and retries), so a crash anywhere replays the batch and read_committed readers see
exactly one response per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from inference_workers.cache import ResponseCache
from inference_workers.cancels import CancelRegistry
from inference_workers.config import ConfigError, models_file
from inference_workers.router import Router
from inference_workers.worker.answer import Answerer
from inference_workers.worker.cancel_reader import CancelReader
from inference_workers.worker.intake import Intake, Pending, Rebalance
from infra.kafka.clients import make_consumer, make_producer, transactional_id
from infra.kafka.codec import Encoded, Output, encode
from infra.kafka.directory import TopicDirectory
from infra.kafka.dlq import UnknownTenant, encode_dead_letter
from infra.kafka.publisher import TransactionalPublisher
from infra.settings import Settings
from infra.telemetry import reinject_headers, start_span_from_headers, tracing_enabled
from schemas import LANES, TokenChunk
from schemas.topics import max_event_bytes

log = logging.getLogger(__name__)

COMPONENT = "worker"


@dataclass
class WorkerStats:
    """The Kafka side's counters; what happened to the requests is `answerer.stats`."""

    batches: int = 0
    tokens_out: int = 0
    longest_batch_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)


class InferenceWorker:
    def __init__(self, settings: Settings, *, router: Router | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.group_id = f"{settings.topic_prefix}.{COMPONENT}"
        self.router = router or Router(settings)
        self._own_router = router is None
        self.cache = ResponseCache(
            settings.response_cache_size,
            redis_url=settings.redis_url.get_secret_value() if settings.redis_url else None,
            ttl_s=settings.response_cache_ttl_s,
            namespace=settings.topic_prefix,
        )
        self.stats = WorkerStats()
        #: Requests cancelled by their clients (every tenant's cancel topic, see `cancel_reader`).
        self.cancels = CancelRegistry()
        self.answerer = Answerer(
            topics=self.topics,
            router=self.router,
            cache=self.cache,
            stage_id=self.group_id,
            emit_token=self._emit_token,
            cancels=self.cancels,
        )
        self.batch_lock = asyncio.Lock()
        self.reload_requested = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self.publisher = TransactionalPublisher(
            settings,
            group_id=self.group_id,
            transactional_id=transactional_id(settings, COMPONENT),
            client_id=COMPONENT,
        )
        self._tokens: AIOKafkaProducer | None = None
        #: Which tenants' reply topics exist (answers name their tenant's topics).
        self.directory = TopicDirectory(settings)
        self.cancel_reader = CancelReader(
            settings,
            self.cancels,
            self.directory,
            stage=self.group_id,
            dead_letter=self._send_dead_letters,
            on_duty=self._on_dlq_duty,
        )
        self._token_queue: asyncio.Queue[TokenChunk | None] = asyncio.Queue()
        self.intake: Intake | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: How long a stopping worker waits for the batch in flight to commit.
        self.drain_timeout_s = 120.0

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.router.start()
        await self.cache.start()
        s = self.settings
        lanes = {self.topics.enriched(lane): lane for lane in LANES}
        self._tokens = make_producer(s, client_id=f"{COMPONENT}-tokens", linger_ms=0)
        self._consumer = make_consumer(s, group_id=self.group_id, client_id=COMPONENT)
        await self.publisher.start()  # fences a crashed predecessor before anything is read
        await self.directory.start()
        await self._tokens.start()
        await self.cancel_reader.start()
        await self._consumer.start()
        self.intake = Intake(
            self._consumer,
            lanes=lanes,
            max_bytes={t: max_event_bytes(t, s.topic_prefix) for t in lanes},
            max_inflight=s.llm_max_inflight,
            chat_headroom=s.llm_max_batch,
        )
        self._consumer.subscribe(list(lanes), listener=Rebalance(self.intake, self.batch_lock, _noop))
        log.info(
            "worker: consuming %s as %s; models %s; batch ≤ %d, wait ≤ %.0f ms, in flight ≤ %d",
            ", ".join(lanes),
            self.group_id,
            self.router.table.names() if self.router.table else [],
            s.llm_max_batch,
            s.llm_max_wait_ms,
            s.llm_max_inflight,
        )

    async def stop(self) -> None:
        await self.publisher.stop()
        for client in (self._consumer, self._tokens):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        await self.cancel_reader.stop()
        await self.cache.close()
        await self.directory.close()
        if self._own_router:
            await self.router.close()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set (or the task is cancelled)."""
        stop = stop or asyncio.Event()
        if self._consumer is None:
            await self.start()
        polling = asyncio.Event()  # set once the last batch is done: polling (heartbeats) outlives it
        poll = asyncio.create_task(self._poll_loop(polling), name="worker-poll")
        batch = asyncio.create_task(self._batch_loop(stop), name="worker-batch")
        helpers = [
            asyncio.create_task(self._token_loop(), name="worker-tokens"),
            asyncio.create_task(self._watch_models(stop), name="worker-models"),
            asyncio.create_task(self.cancel_reader.run(polling), name="worker-cancels"),
        ]
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([poll, batch, stopped], return_when=asyncio.FIRST_COMPLETED)
            stop.set()
            # The batch in flight finishes and commits (a restart would only redo it).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(batch), self.drain_timeout_s)
            for t in (poll, batch):
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            stop.set()
            polling.set()
            for t in [poll, batch, stopped, *helpers]:
                t.cancel()
            for t in [poll, batch, stopped, *helpers]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await self.stop()

    # --- loops ----------------------------------------------------------------------------------
    async def _poll_loop(self, stop: asyncio.Event) -> None:
        assert self.intake is not None
        while not stop.is_set():
            try:
                await self.intake.poll_once()
            except KafkaError:
                log.exception("poll failed; retrying")
                await asyncio.sleep(1)

    async def _batch_loop(self, stop: asyncio.Event) -> None:
        assert self.intake is not None
        s = self.settings
        while not stop.is_set():
            await self.intake.wait_for_work(s.llm_max_batch, s.llm_max_wait_ms / 1000, stop)
            if stop.is_set():
                return
            async with self.batch_lock:
                items = self.intake.take(s.llm_max_batch)
                if not items:
                    continue
                try:
                    await self.process(items)
                finally:
                    self.intake.finished(len(items))

    async def _token_loop(self) -> None:
        assert self._tokens is not None
        while True:
            chunk = await self._token_queue.get()
            if chunk is None:
                return
            try:
                if not await self.directory.exists(self.topics.tenant(chunk.tenant_id).tokens):
                    continue  # no such tenant (its answer is dead-lettered): waiting would stall the rest
                enc = encode(chunk)
                await self._tokens.send(
                    self.topics.tenant(chunk.tenant_id).tokens, enc.value, key=enc.key, headers=enc.headers
                )
                self.stats.tokens_out += 1
            except KafkaError as e:  # tokens are best-effort; the final response carries the answer
                log.warning("token chunk for %s not sent: %s", chunk.request_id, e)

    async def _watch_models(self, stop: asyncio.Event) -> None:
        """Reload the route table on SIGHUP (`ragbus models reload`) or when the models file changes."""
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_requested.set)
        last = _mtime(models_file(self.settings))
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reload_requested.wait(), 2.0)
            now = _mtime(models_file(self.settings))
            if self.reload_requested.is_set() or now != last:
                self.reload_requested.clear()
                last = now
                try:
                    await self.router.reload(guard=self.batch_lock)
                except (ConfigError, Exception) as e:  # noqa: BLE001 - a bad file keeps the old table
                    log.error("models not reloaded, keeping the current table: %s", e)

    # --- one batch ------------------------------------------------------------------------------
    async def process(self, items: list[Pending]) -> None:
        """Answer `items` and commit the answers with their offsets in one transaction. Raises
        PublishError when the answers cannot be committed (the worker then stops)."""
        # Cancels published before this batch started are read first: their requests are skipped.
        await self.cancel_reader.caught_up({p.event.tenant_id for p in items if p.event is not None})
        started = time.time()
        spans = self._open_spans(items) if tracing_enabled() else {}
        outputs = await self._routable(items, await self.answerer.answer(items, started))
        elapsed = time.time() - started
        self.stats.longest_batch_s = max(self.stats.longest_batch_s, elapsed)
        self.stats.batch_sizes.append(len(items))
        if spans:
            outputs = [[_traced(out, spans) for out in outs] for outs in outputs]
        try:
            await self.publisher.submit([(p.record, outs) for p, outs in zip(items, outputs, strict=True)])
        finally:
            for span in spans.values():
                span.end()
        self.stats.batches += 1
        lanes = {lane: sum(1 for p in items if p.lane == lane) for lane in LANES}
        log.info(
            "batch of %d (chat %d, bulk %d) answered in %.0f ms",
            len(items),
            lanes["chat"],
            lanes["bulk"],
            elapsed * 1000,
        )

    async def _routable(self, items: list[Pending], outputs: list[list[Output]]) -> list[list[Output]]:
        """`outputs` without those for topics that do not exist (a tenant without topics: a send
        there would stall the transaction and every retry); such a request is dead-lettered
        (`unknown_tenant`) instead of answered."""
        routed: list[list[Output]] = []
        for p, outs in zip(items, outputs, strict=True):
            kept = [out for out in outs if await self.directory.exists(out[0])]
            if len(kept) < len(outs):
                missing = sorted({topic for topic, _ in outs} - {topic for topic, _ in kept})
                log.warning("no topic %s: %s/%d@%d", ", ".join(missing), *_coords(p.record))
                if not any(topic.endswith(".dlq") for topic, _ in kept):
                    error = UnknownTenant(
                        f"no topic {', '.join(missing)}: the tenant has no topics (never added, or "
                        "removed); add it with `ragbus tenants add`"
                    )
                    kept.append(encode_dead_letter(p.record, error, stage=self.group_id))
            routed.append(kept)
        return routed

    async def _send_dead_letters(self, outputs: list[Output]) -> None:
        """Dead letters of malformed cancels: outside the transaction (a cancel record is read by
        every worker, committed by none), through the idempotent token producer."""
        assert self._tokens is not None
        for topic, enc in outputs:
            await self._tokens.send_and_wait(topic, enc.value, key=enc.key, headers=enc.headers)

    def _on_dlq_duty(self) -> bool:
        """Whether this worker reports malformed cancels: the one that owns chat.enriched[0]."""
        consumer = self._consumer
        if consumer is None:
            return False
        return TopicPartition(self.topics.enriched("chat"), 0) in consumer.assignment()

    def _emit_token(self, chunk: TokenChunk) -> None:
        """Queue a streamed chunk for the token task (engines call this from their threads)."""
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(self._token_queue.put_nowait, chunk)

    def _open_spans(self, items: list[Pending]) -> dict[bytes, Any]:
        """One span per request, from when its record arrived until its answer is committed; a
        child of the retrieval span whose context the enriched record carries."""
        spans = {}
        for p in items:
            if p.event is not None:
                spans[p.event.request_id.encode()] = start_span_from_headers(
                    "inference",
                    p.record.headers,
                    component=COMPONENT,
                    start_time_s=p.received,
                    **{"ragbus.request_id": p.event.request_id, "ragbus.lane": p.lane},
                )
        return spans


def _traced(out: Output, spans: dict[bytes, Any]) -> Output:
    """`out` carrying the trace context of its request's span (responses are keyed by request id)."""
    topic, enc = out
    span = spans.get(enc.key)
    if span is None:
        return out
    return topic, Encoded(enc.key, enc.value, reinject_headers(enc.headers, span))


def _coords(record: Any) -> tuple[str, int, int]:
    return record.topic, record.partition, record.offset


def _mtime(path: Any) -> float | None:
    try:
        return os.stat(path).st_mtime if path is not None else None
    except OSError:
        return None


async def _noop() -> None:
    return None
