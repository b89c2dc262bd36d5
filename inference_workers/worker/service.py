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

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from inference_workers.cache import CachedAnswer, ResponseCache, cache_key, cacheable
from inference_workers.config import ConfigError, models_file
from inference_workers.engines.base import Completion, Engine, Generation
from inference_workers.prompt import BuiltPrompt, ContextOverflow, build_prompt, citations_for
from inference_workers.router import Router
from inference_workers.worker import respond
from inference_workers.worker.intake import Intake, Pending, Rebalance
from infra.kafka.clients import make_consumer, make_producer, transactional_id
from infra.kafka.codec import Encoded, encode
from infra.kafka.dlq import encode_dead_letter, rejection_response
from infra.kafka.publisher import TransactionalPublisher
from infra.settings import Settings
from infra.telemetry import reinject_headers, start_span_from_headers, tracing_enabled
from schemas import LANES, ErrorCode, TokenChunk
from schemas.topics import max_event_bytes

log = logging.getLogger(__name__)

COMPONENT = "worker"
Output = tuple[str, Any]


@dataclass
class WorkerStats:
    batches: int = 0
    answered: int = 0
    errors: int = 0
    dead_letters: int = 0
    cache_hits: int = 0
    tokens_out: int = 0
    longest_batch_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)


@dataclass
class _Job:
    """A request routed to an engine, waiting for its generation."""

    pending: Pending
    model: str
    engine: Engine
    prompt: BuiltPrompt
    key: str | None
    generation: Generation


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
            ttl_s=getattr(settings, "response_cache_ttl_s", 3600),
            namespace=settings.topic_prefix,
        )
        self.stats = WorkerStats()
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
        await self._tokens.start()
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
        await self.cache.close()
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
                enc = encode(chunk)
                await self._tokens.send(self.topics.tokens, enc.value, key=enc.key, headers=enc.headers)
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
        started = time.time()
        spans = self._open_spans(items) if tracing_enabled() else {}
        outputs: list[list[Output]] = [[] for _ in items]  # per item, in order
        jobs: dict[str, list[tuple[int, _Job]]] = {}
        prepared = await asyncio.gather(*(self._prepare_one(p, started) for p in items))
        for i, prep in enumerate(prepared):
            if isinstance(prep, _Job):
                jobs.setdefault(prep.model, []).append((i, prep))
            else:
                outputs[i] = prep
        results = await asyncio.gather(
            *(self._generate(group[0][1].engine, [j for _, j in group], started) for group in jobs.values())
        )
        for group, group_outputs in zip(jobs.values(), results, strict=True):
            for (i, _), out in zip(group, group_outputs, strict=True):
                outputs[i] = out
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

    async def _prepare_one(self, item: Pending, started: float) -> _Job | list[Output]:
        """`_prepare`, with any failure confined to this request: dead letter plus an error reply,
        the rest of the batch goes on."""
        try:
            return await self._prepare(item, started)
        except Exception as e:
            log.exception(
                "preparing %s/%d@%d failed", item.record.topic, item.record.partition, item.record.offset
            )
            return self._failed(item, e, "the request could not be prepared")

    def _failed(self, item: Pending, err: BaseException, what: str, model: str | None = None) -> list[Output]:
        """Dead letter plus an `engine_error` reply for a valid request whose handling failed; the
        reply names the error class only (its text is in the dead letter and the log)."""
        self.stats.errors += 1
        out = self._dead_letter(item, err, respond_too=item.event is None)
        if item.event is not None:
            try:
                out.append(
                    respond.error(
                        item.event,
                        topics=self.topics,
                        code=ErrorCode.ENGINE_ERROR,
                        message=f"{what} ({type(err).__name__})",
                        model=model,
                    )
                )
            except Exception:
                log.exception("no error reply for %s", item.event.request_id)
        return out

    async def _prepare(self, item: Pending, started: float) -> _Job | list[Output]:
        """Everything short of generation: reject, expire, route, build the prompt, hit the cache."""
        topics = self.topics
        if item.error is not None or item.event is None:
            return self._dead_letter(item, item.error or ValueError("undecodable"), respond_too=True)
        ev = item.event
        queue_ms = _queue_ms(item, started)
        if ev.expired() or ev.request.expired():
            self.stats.errors += 1
            return [
                respond.error(
                    ev,
                    topics=topics,
                    code=ErrorCode.DEADLINE_EXCEEDED,
                    message="the request's deadline passed before the model could start on it",
                    queue_ms=queue_ms,
                )
            ]
        routed = self.router.route(ev.request.model, ev.request_id)
        if routed is None:
            self.stats.errors += 1
            known = ", ".join(self.router.table.names()) if self.router.table else ""
            return [
                respond.error(
                    ev,
                    topics=topics,
                    code=ErrorCode.UNKNOWN_MODEL,
                    message=f"unknown model {ev.request.model!r}; served models: {known}",
                    queue_ms=queue_ms,
                )
            ]
        name, engine = routed
        try:
            built = await asyncio.to_thread(
                build_prompt,
                ev,
                render=engine.render,
                count=engine.count_tokens,
                context_window=engine.context_window,
            )
        except ContextOverflow as e:
            self.stats.errors += 1
            return [
                respond.error(
                    ev,
                    topics=topics,
                    code=ErrorCode.CONTEXT_OVERFLOW,
                    message=str(e),
                    model=name,
                    queue_ms=queue_ms,
                )
            ]
        except Exception as e:
            log.exception("prompt for %s failed", ev.request_id)
            return self._failed(item, e, "the prompt could not be built", model=name)
        sampling = ev.request.sampling
        key = None
        if self.cache.enabled and cacheable(sampling):
            key = cache_key(
                model=name, tenant_id=ev.tenant_id, prompt=built.text, chunks=built.chunks, sampling=sampling
            )
            hit = await self.cache.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                self.stats.answered += 1
                return [
                    respond.answer(
                        ev,
                        topics=topics,
                        model=name,
                        text=hit.text,
                        citations=citations_for(hit.text, built.chunks),
                        prompt_tokens=hit.prompt_tokens,
                        completion_tokens=hit.completion_tokens,
                        finish_reason=hit.finish_reason,
                        cached=True,
                        queue_ms=queue_ms,
                        generate_ms=0.0,
                    )
                ]
        if built.room < sampling.max_tokens:
            sampling = sampling.model_copy(update={"max_tokens": built.room})
        on_token = self._streamer(ev) if ev.request.stream else None
        generation = Generation(built.text, sampling, ev.request_id, on_token, prompt_ids=built.token_ids)
        return _Job(item, name, engine, built, key, generation)

    async def _generate(self, engine: Engine, jobs: list[_Job], started: float) -> list[list[Output]]:
        """The outputs of each job, in order."""
        t0 = time.perf_counter()
        completions = await self._complete(engine, jobs)
        gen_ms = (time.perf_counter() - t0) * 1000
        out: list[list[Output]] = []
        for job, done in zip(jobs, completions, strict=True):
            try:
                out.append(await self._respond(job, done, started, gen_ms))
            except Exception as e:
                log.exception("answering %s failed", job.generation.request_id)
                out.append(self._failed(job.pending, e, "the answer could not be published", model=job.model))
        return out

    async def _complete(self, engine: Engine, jobs: list[_Job]) -> list[Completion]:
        """The engine's completions for `jobs`; when the batch fails, each job alone, so that a
        request that breaks the engine fails alone and the others are answered."""
        try:
            async with self.router.using(engine):
                completions = list(await engine.generate([j.generation for j in jobs]))
            if len(completions) == len(jobs):
                return completions
            error: BaseException = RuntimeError(f"{len(completions)} completions for {len(jobs)} prompts")
        except Exception as e:  # noqa: BLE001 - isolated below
            error = e
        log.error("%s: generation failed for a batch of %d: %r", engine.name, len(jobs), error)
        if len(jobs) == 1:
            return [Completion(finish_reason="error", error=f"{type(error).__name__}: {error}")]
        singles: list[Completion] = []
        for job in jobs:
            singles.extend(await self._complete(engine, [job]))
        return singles

    async def _respond(self, job: _Job, done: Completion, started: float, gen_ms: float) -> list[Output]:
        """The response (or error reply and dead letter) for one finished generation."""
        out: list[Output] = []
        ev = job.pending.event
        assert ev is not None
        queue_ms = _queue_ms(job.pending, started)
        if job.generation.on_token is not None:
            self._token_queue.put_nowait(
                TokenChunk(**ev.envelope(), index=_FINAL_INDEX, text="", final=True, model=job.model)  # type: ignore[arg-type]
            )
        if done.error is not None:
            self.stats.errors += 1
            out.extend(self._dead_letter(job.pending, RuntimeError(done.error), respond_too=False))
            out.append(
                respond.error(
                    ev,
                    topics=self.topics,
                    code=ErrorCode.ENGINE_ERROR,
                    message=f"the model failed: {done.error}",
                    model=job.model,
                    queue_ms=queue_ms,
                    generate_ms=gen_ms,
                )
            )
            return out
        self.stats.answered += 1
        text = done.text.strip()
        if job.key is not None:
            await self.cache.put(
                job.key,
                CachedAnswer(text, done.prompt_tokens, done.completion_tokens, done.finish_reason),
            )
        out.append(
            respond.answer(
                ev,
                topics=self.topics,
                model=job.model,
                text=text,
                citations=citations_for(text, job.prompt.chunks),
                prompt_tokens=done.prompt_tokens,
                completion_tokens=done.completion_tokens,
                finish_reason=done.finish_reason,
                cached=False,
                queue_ms=queue_ms,
                generate_ms=gen_ms,
            )
        )
        return out

    def _streamer(self, ev: Any) -> Any:
        """A token callback (safe from any thread) that queues TokenChunk events in order."""
        loop = self._loop
        assert loop is not None
        envelope = ev.envelope()
        counter = iter(range(1 << 30))

        def on_token(text: str) -> None:
            chunk = TokenChunk(**envelope, index=next(counter), text=text)
            loop.call_soon_threadsafe(self._token_queue.put_nowait, chunk)

        return on_token

    def _dead_letter(self, item: Pending, err: BaseException, *, respond_too: bool) -> list[Output]:
        self.stats.dead_letters += 1
        rec = item.record
        log.warning("%s/%d@%d to the DLQ: %s", rec.topic, rec.partition, rec.offset, err)
        out: list[Output] = [encode_dead_letter(rec, err, stage=self.group_id)]
        if respond_too:
            reply = rejection_response(rec, err, topics=self.topics)
            if reply is not None:
                out.append(reply)
        return out


#: The index of the closing TokenChunk (after every text chunk of an answer).
_FINAL_INDEX = (1 << 30) - 1


def _traced(out: Output, spans: dict[bytes, Any]) -> Output:
    """`out` carrying the trace context of its request's span (responses are keyed by request id)."""
    topic, enc = out
    span = spans.get(enc.key)
    if span is None:
        return out
    return topic, Encoded(enc.key, enc.value, reinject_headers(enc.headers, span))


def _queue_ms(item: Pending, started: float) -> float | None:
    ts = item.record.timestamp
    if not ts or ts <= 0:
        return None
    return max(0.0, started * 1000 - ts)


def _mtime(path: Any) -> float | None:
    try:
        return os.stat(path).st_mtime if path is not None else None
    except OSError:
        return None


async def _noop() -> None:
    return None
