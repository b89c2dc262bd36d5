"""The inference worker on the real broker with the real CPU model (SmolLM2-135M-Instruct on
llama.cpp, loaded once for the module): answers from context, errors, priority, back-pressure,
long batches without rebalances, route reloads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inference_workers.engines.llamacpp import LlamaCppEngine
from inference_workers.router import Router
from inference_workers.worker.service import InferenceWorker
from infra.settings import Settings
from schemas import DeadLetter, ErrorCode, TokenChunk
from tests.helpers import read_events, wait_for
from tests.integration.inference_support import CASES, answered, enriched, feed, responses, running

pytest.importorskip("llama_cpp")

MODEL = "smollm2"


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    # A 2048-token window keeps the KV cache small; 16 sequences per decode.
    eng = LlamaCppEngine(MODEL, max_batch=16, context_window=2048)
    await eng.start()
    yield eng
    await eng.close()


def make_worker(settings: Settings, engine: LlamaCppEngine, **overrides: object) -> InferenceWorker:
    s = settings.model_copy(update={"llm_max_batch": 16, **overrides})
    return InferenceWorker(s, router=Router(s, shared={MODEL: engine}))


async def test_answers_from_the_retrieved_context(settings: Settings, engine: LlamaCppEngine) -> None:
    # Two tenants: every answer goes to its own tenant's topics, and a cached answer to nobody else.
    events = [
        enriched(q, passage, lane="chat" if i % 2 == 0 else "bulk", tenant="t" if i % 2 == 0 else "acme")
        for i, (q, passage, _) in enumerate(CASES)
    ]
    streamed = enriched(CASES[0][0], CASES[0][1], stream=True, tenant="t")
    repeat = enriched(CASES[1][0], CASES[1][1])  # same prompt as events[1]: served from the cache
    elsewhere = enriched(CASES[1][0], CASES[1][1], tenant="t")  # same prompt, another tenant: not
    await feed(settings, [*events, streamed])
    worker = make_worker(settings, engine)
    async with running(worker):
        ids = {e.request_id for e in [*events, streamed]}
        got = await wait_for(lambda: answered(settings, ids), timeout=180, what="answers")
        await feed(settings, [repeat, elsewhere])
        later = {repeat.request_id, elsewhere.request_id}
        again = await wait_for(lambda: answered(settings, later), timeout=120, what="cached")

    for ev, (_, _, expected) in zip(events, CASES, strict=True):
        (r,) = got[ev.request_id]
        assert r.ok, r.error
        assert expected.lower() in r.answer.lower(), r.answer
        assert r.lane == ev.lane and r.model == MODEL and r.finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens > 50 and r.usage.completion_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert {c.chunk_id for c in r.citations} <= {"c-answer", "c-distractor"} and r.citations
        assert r.timings.generate_ms and r.timings.generate_ms > 0
        assert r.timings.inference_queue_ms is not None and r.timings.total_ms is not None
        assert not r.cached

    (cached,) = again[repeat.request_id]
    assert cached.cached and cached.answer == got[events[1].request_id][0].answer
    assert cached.usage == got[events[1].request_id][0].usage
    (fresh,) = again[elsewhere.request_id]
    assert fresh.ok and not fresh.cached and fresh.tenant_id == "t"

    for record, r in await responses(settings):
        assert record.topic == settings.topics.tenant(r.tenant_id).responses(r.lane)
    assert {r.tenant_id for _, r in await responses(settings)} == {"t", "acme"}
    assert all(got[e.request_id][0].tenant_id == e.tenant_id for e in events)

    tokens = [t for t in await read_events(settings, settings.topics.tenant("t").tokens, TokenChunk)]
    mine = sorted((t for t in tokens if t.request_id == streamed.request_id), key=lambda t: t.index)
    assert mine and mine[-1].final
    assert await read_events(settings, settings.topics.tenant("acme").tokens, TokenChunk, timeout=5) == []
    (final,) = got[streamed.request_id]
    assert "".join(t.text for t in mine).strip() == final.answer


async def test_clear_errors_without_touching_the_engine(settings: Settings, engine: LlamaCppEngine) -> None:
    from datetime import UTC, datetime, timedelta

    past = datetime.now(UTC) - timedelta(seconds=1)
    late = enriched("Too late?", deadline=past)
    unknown = enriched("Which model?", model="no-such-model")
    huge = enriched("why " * 6000, max_tokens=64)  # ~6000 tokens: over the 2048-token window
    invalid = b'{"request_id": "r-bad", "tenant_id": "acme", "lane": "chat", "request": {"question": ""}}'
    # A tenant without topics: its answer would stall every transaction, so it is dead-lettered.
    ghost = enriched("Anyone there?", deadline=past, tenant="ghost")
    ghost_bytes = b'{"request_id": "r-ghost", "tenant_id": "ghost", "lane": "chat", "request": {}}'
    await feed(settings, [ghost, late, unknown, huge], raw=[("chat", invalid), ("chat", ghost_bytes)])
    worker = make_worker(settings, engine)
    async with running(worker):
        ids = {late.request_id, unknown.request_id, huge.request_id, "r-bad"}
        got = await wait_for(lambda: answered(settings, ids), timeout=120, what="error responses")
    assert got[late.request_id][0].error.code == ErrorCode.DEADLINE_EXCEEDED  # type: ignore[union-attr]
    err = got[unknown.request_id][0].error
    assert err is not None and err.code == ErrorCode.UNKNOWN_MODEL and MODEL in err.message
    err = got[huge.request_id][0].error
    assert err is not None and err.code == ErrorCode.CONTEXT_OVERFLOW and "2048" in err.message
    assert got["r-bad"][0].error.code == ErrorCode.INVALID_REQUEST  # type: ignore[union-attr]
    assert all(len(v) == 1 for v in got.values())
    letters = await read_events(settings, settings.topics.dlq(settings.topics.enriched("chat")), DeadLetter)
    assert sorted((d.error_class, d.request_id) for d in letters) == [
        ("schema_validation", "r-bad"),
        ("schema_validation", "r-ghost"),
        ("unknown_tenant", ghost.request_id),
    ]
    assert not {ghost.request_id, "r-ghost"} & {r.request_id for _, r in await responses(settings)}
    assert worker.answerer.stats.answered == 0  # none of them reached the model


async def test_64_mixed_requests_chat_overtakes_bulk(settings: Settings, engine: LlamaCppEngine) -> None:
    """Bulk requests queued first, chat after: every request is answered once, and chat answers
    are committed ahead of most of the bulk backlog."""
    # Short distinct prompts (no context, so each costs little; distinct, so no cache hits).
    bulk = [enriched(f"Name a colour ({i}).", lane="bulk", max_tokens=6) for i in range(48)]
    chat = [enriched(f"Name an animal ({i}).", lane="chat", max_tokens=6) for i in range(16)]
    await feed(settings, bulk)
    await feed(settings, chat)
    worker = make_worker(settings, engine, llm_max_batch=8, llm_max_wait_ms=200)
    async with running(worker):
        ids = {e.request_id for e in [*bulk, *chat]}
        got = await wait_for(lambda: answered(settings, ids), timeout=300, what="64 answers")
    assert all(len(got[i]) == 1 and got[i][0].ok for i in ids)
    order = sorted(await responses(settings), key=lambda rr: rr[0].timestamp)
    lanes = [r.lane for _, r in order]
    last_chat = max(i for i, lane in enumerate(lanes) if lane == "chat")
    bulk_before = lanes[:last_chat].count("bulk")
    assert bulk_before < len(bulk) // 2, lanes


async def test_pauses_at_the_inflight_limit_and_answers_everything(
    settings: Settings, engine: LlamaCppEngine
) -> None:
    events = [enriched(f"Say hello number {i}.", lane="bulk", max_tokens=4) for i in range(24)]
    await feed(settings, events)
    worker = make_worker(settings, engine, llm_max_batch=4, llm_max_inflight=6, llm_max_wait_ms=0)
    async with running(worker):
        got = await wait_for(
            lambda: answered(settings, {e.request_id for e in events}), timeout=180, what="answers"
        )
    assert all(len(v) == 1 for v in got.values())
    assert worker.intake is not None
    assert worker.intake.stats.pauses > 0
    # bulk may hold at most the in-flight limit plus one poll's worth (capped by the room left)
    assert worker.intake.stats.max_held <= 6 + 4
    assert max(worker.stats.batch_sizes) <= 4


async def test_batches_longer_than_max_poll_interval_cause_no_rebalance(
    settings: Settings, engine: LlamaCppEngine
) -> None:
    events = [
        enriched(f"Write a long story about a dragon named Ember {i}.", max_tokens=160, stream=True)
        for i in range(6)
    ]
    await feed(settings, events)
    worker = make_worker(
        settings, engine, kafka_max_poll_interval_ms=2000, kafka_session_timeout_ms=6000, llm_max_wait_ms=500
    )
    async with running(worker):
        got = await wait_for(
            lambda: answered(settings, {e.request_id for e in events}), timeout=300, what="answers"
        )
        await asyncio.sleep(3)  # past another poll interval: a late rebalance would show here
    assert worker.stats.longest_batch_s > 2.0, "the premise: a batch outlasted max.poll.interval.ms"
    assert worker.intake is not None
    assert worker.intake.stats.assignments == 1 and worker.intake.stats.revocations == 0
    assert all(len(v) == 1 and v[0].ok for v in got.values())


async def test_route_table_reload_loses_nothing(
    settings: Settings, engine: LlamaCppEngine, tmp_path: Path
) -> None:
    """Weighted routes from a models file; rewriting the file while requests are in flight
    switches the route for later requests and answers every request once."""
    models = tmp_path / "models.json"

    def write(routes: dict[str, int]) -> None:
        spec = [{"name": n, "backend": "llamacpp"} for n in ("stable", "canary")]
        models.write_text(json.dumps({"models": spec, "routes": routes}))

    write({"stable": 90, "canary": 10})
    s = settings.model_copy(update={"llm_models_file": models, "llm_max_batch": 8})
    worker = InferenceWorker(s, router=Router(s, shared={"stable": engine, "canary": engine}))
    first = [enriched(f"Say hi {i}.", max_tokens=4) for i in range(40)]
    second = [enriched(f"Say bye {i}.", max_tokens=4) for i in range(16)]
    async with running(worker):
        await feed(settings, first)
        await asyncio.sleep(0.5)
        write({"canary": 100})
        worker.reload_requested.set()
        await wait_for(lambda: _routes_are(worker, {"canary": 100.0}), timeout=30, what="reload")
        await feed(settings, second)
        ids = {e.request_id for e in [*first, *second]}
        got = await wait_for(lambda: answered(settings, ids), timeout=240, what="answers")
    assert all(len(v) == 1 and v[0].ok for v in got.values())
    first_models = [got[e.request_id][0].model for e in first]
    assert "stable" in first_models  # the batches routed before the reload
    assert {got[e.request_id][0].model for e in second} == {"canary"}


async def _routes_are(worker: InferenceWorker, routes: dict[str, float]) -> bool:
    return worker.router.table is not None and dict(worker.router.table.routes) == routes
