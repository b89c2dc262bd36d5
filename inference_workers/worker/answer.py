"""What the inference worker does with one micro-batch, apart from Kafka: check, route, build
prompts, hit the cache, generate, and turn each request into its outputs (an answer, or an error
reply with a dead letter). Every request's failure is its own: it never costs the rest of the
batch. The Kafka side — polling, batching, transactions, spans — is `worker.service`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inference_workers.cache import CachedAnswer, ResponseCache, cache_key, cacheable
from inference_workers.cancels import CancelRegistry
from inference_workers.engines.base import Completion, Engine, Generation
from inference_workers.prompt import BuiltPrompt, ContextOverflow, build_prompt, citations_for
from inference_workers.router import Router
from inference_workers.worker import respond
from inference_workers.worker.intake import Pending
from infra.kafka.codec import Output
from infra.kafka.dlq import encode_dead_letter, rejection_response
from schemas import AnswerChoice, ErrorCode, TokenChunk, Topics

log = logging.getLogger(__name__)

#: The index of the closing TokenChunk (after every text chunk of an answer).
_FINAL_INDEX = (1 << 30) - 1


@dataclass
class AnswerStats:
    answered: int = 0
    errors: int = 0
    dead_letters: int = 0
    cache_hits: int = 0
    #: Answered `cancelled`: skipped on arrival, or stopped while generating.
    cancelled: int = 0


@dataclass
class _Job:
    """A request routed to an engine, waiting for its generation."""

    pending: Pending
    model: str
    engine: Engine
    prompt: BuiltPrompt
    key: str | None
    generation: Generation


class Answerer:
    """Turns a micro-batch of enriched requests into their outputs, one list per request."""

    def __init__(
        self,
        *,
        topics: Topics,
        router: Router,
        cache: ResponseCache,
        stage_id: str,
        emit_token: Callable[[TokenChunk], None],
        cancels: CancelRegistry | None = None,
    ) -> None:
        self.topics = topics
        #: The cancels read from the tenants' cancel topics (None: nothing is ever cancelled).
        self.cancels = cancels
        self.router = router
        self.cache = cache
        #: Written into dead letters as the stage that gave up.
        self.stage_id = stage_id
        #: Queues a streamed TokenChunk; safe to call from any thread.
        self.emit_token = emit_token
        self.stats = AnswerStats()

    async def answer(self, items: list[Pending], started: float) -> list[list[Output]]:
        """The outputs of each of `items`, in order: the engines' batches run concurrently, one
        per model."""
        outputs: list[list[Output]] = [[] for _ in items]
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
        return outputs

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
        reason = self.cancels.reason(ev.tenant_id, ev.request_id) if self.cancels is not None else None
        if reason is not None:
            # Cancelled before it got here: answered without routing, prompting or generating.
            self.stats.cancelled += 1
            self.cancels.honoured()  # type: ignore[union-attr]
            return [respond.cancelled(ev, topics=topics, reason=reason, queue_ms=queue_ms)]
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
        check = self.cancels.check(ev.tenant_id, ev.request_id) if self.cancels is not None else None
        generation = Generation(
            built.text, sampling, ev.request_id, on_token, prompt_ids=built.token_ids, cancelled=check
        )
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
            self.emit_token(
                TokenChunk(**ev.envelope(), index=_FINAL_INDEX, text="", final=True, model=job.model)  # type: ignore[arg-type]
            )
        failed = next((d.error for d in done.samples if d.error is not None), None)
        if failed is not None:
            self.stats.errors += 1
            out.extend(self._dead_letter(job.pending, RuntimeError(failed), respond_too=False))
            out.append(
                respond.error(
                    ev,
                    topics=self.topics,
                    code=ErrorCode.ENGINE_ERROR,
                    message=f"the model failed: {failed}",
                    model=job.model,
                    queue_ms=queue_ms,
                    generate_ms=gen_ms,
                )
            )
            return out
        if done.finish_reason == "cancelled":
            self.stats.cancelled += 1
            if self.cancels is not None:
                self.cancels.honoured()
            reason = self.cancels.reason(ev.tenant_id, ev.request_id) if self.cancels is not None else None
            out.append(
                respond.cancelled(
                    ev,
                    topics=self.topics,
                    reason=reason or "cancelled",
                    model=job.model,
                    text=done.text.strip(),
                    prompt_tokens=done.prompt_tokens,
                    completion_tokens=sum(d.completion_tokens for d in done.samples),
                    queue_ms=queue_ms,
                    generate_ms=gen_ms,
                )
            )
            return out  # never cached: it is not the answer
        self.stats.answered += 1
        text = done.text.strip()
        sampling = job.generation.sampling
        choices = None
        if sampling.n > 1 or sampling.logprobs:
            choices = [
                AnswerChoice(
                    index=k,
                    text=d.text.strip(),
                    finish_reason="length" if d.finish_reason == "length" else "stop",
                    logprobs=d.logprobs if sampling.logprobs else None,
                )
                for k, d in enumerate(done.samples)
            ]
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
                # Every sample's tokens, as OpenAI counts them.
                completion_tokens=sum(d.completion_tokens for d in done.samples),
                finish_reason=done.finish_reason,
                cached=False,
                queue_ms=queue_ms,
                generate_ms=gen_ms,
                choices=choices,
            )
        )
        return out

    def _streamer(self, ev: Any) -> Any:
        """A token callback (safe from any thread) that queues TokenChunk events in order."""
        envelope = ev.envelope()
        counter = iter(range(1 << 30))

        def on_token(text: str) -> None:
            self.emit_token(TokenChunk(**envelope, index=next(counter), text=text))

        return on_token

    def _dead_letter(self, item: Pending, err: BaseException, *, respond_too: bool) -> list[Output]:
        self.stats.dead_letters += 1
        rec = item.record
        log.warning("%s/%d@%d to the DLQ: %s", rec.topic, rec.partition, rec.offset, err)
        out: list[Output] = [encode_dead_letter(rec, err, stage=self.stage_id)]
        if respond_too:
            reply = rejection_response(rec, err, topics=self.topics)
            if reply is not None:
                out.append(reply)
        return out


def _queue_ms(item: Pending, started: float) -> float | None:
    ts = item.record.timestamp
    if not ts or ts <= 0:
        return None
    return max(0.0, started * 1000 - ts)
