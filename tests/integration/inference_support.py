"""Shared pieces of the inference worker tests: enriched requests the real SmolLM2 answers right,
feeding them onto the enriched topics, and reading the committed responses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from infra.kafka.clients import make_producer
from infra.kafka.codec import encode
from infra.settings import Settings
from schemas import ChatRequest, ChatResponse, EnrichedRequest, Lane, RetrievedChunk, SamplingParams
from tests.helpers import read_topic

#: (question, the passage that answers it, what the answer must contain). SmolLM2-135M-Instruct
#: answered each of these correctly with the worker's prompt (checked by hand; greedy decoding).
CASES = [
    (
        "What colour is the sky on Zorblat?",
        "On the planet Zorblat the sky is green and the grass is purple.",
        "green",
    ),
    (
        "Who founded the Quillmark company?",
        "The Quillmark company was founded by Elena Vasquez in 1987 in Lisbon.",
        "Elena Vasquez",
    ),
    (
        "What is the password for the staff wifi?",
        "The staff wifi password is tangerine42. Guests use the open network.",
        "tangerine42",
    ),
]
DISTRACTOR = "Unrelated: the library opens at 9am on weekdays."


def enriched(
    question: str,
    passage: str | None = None,
    *,
    lane: Lane = "chat",
    max_tokens: int = 24,
    tenant: str = "acme",
    **request: Any,
) -> EnrichedRequest:
    req = ChatRequest(
        tenant_id=tenant,
        lane=lane,
        question=question,
        sampling=SamplingParams(max_tokens=max_tokens),
        **request,
    )
    chunks = []
    if passage is not None:
        chunks = [
            RetrievedChunk(chunk_id="c-distractor", doc_id="library", text=DISTRACTOR, score=0.21),
            RetrievedChunk(chunk_id="c-answer", doc_id="facts", text=passage, score=0.87, title="Facts"),
        ]
    return EnrichedRequest(**req.envelope(), request=req, chunks=chunks, no_context=not chunks)


async def feed(
    settings: Settings, events: list[EnrichedRequest], *, raw: list[tuple[Lane, bytes]] = ()
) -> None:
    """Publish enriched requests (and raw bytes) onto their lane's enriched topic."""
    producer = make_producer(settings)
    await producer.start()
    try:
        for ev in events:
            enc = encode(ev)
            await producer.send(
                settings.topics.enriched(ev.lane), enc.value, key=enc.key, headers=enc.headers
            )
        for lane, value in raw:
            await producer.send(settings.topics.enriched(lane), value, key=b"raw")
        await producer.flush()
    finally:
        await producer.stop()


async def responses(settings: Settings, lanes: tuple[Lane, ...] = ("chat", "bulk")) -> list[Any]:
    """Committed response records of both lanes (read_committed), as (record, ChatResponse)."""
    out = []
    for lane in lanes:
        for record in await read_topic(settings, settings.topics.responses(lane)):
            out.append((record, ChatResponse.model_validate_json(record.value)))
    return out


async def answered(settings: Settings, request_ids: set[str]) -> dict[str, list[ChatResponse]]:
    """Responses by request id, once every id in `request_ids` has at least one (else {})."""
    by_id: dict[str, list[ChatResponse]] = {}
    for _, r in await responses(settings):
        by_id.setdefault(r.request_id, []).append(r)
    return by_id if request_ids <= set(by_id) else {}


@contextlib.asynccontextmanager
async def running(worker: Any) -> AsyncIterator[Any]:
    """Run an InferenceWorker in this event loop for the duration of the block."""
    stop = asyncio.Event()
    await worker.start()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 120)
