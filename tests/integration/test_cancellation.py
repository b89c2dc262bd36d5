"""Cancellation through the real stack: gateway, processors and inference worker (SmolLM2-135M on
llama.cpp) as the `ragbus` processes a user starts, against the session's broker and Postgres.

- A streaming client that closes its connection after the first chunks stops its generation: the
  committed response for its request id is the one `cancelled` answer, with far fewer completion
  tokens than it asked for, and the worker answers the next request as usual.
- A request cancelled before it reaches the worker is answered `cancelled` without generating.
- A malformed cancel is dead-lettered; the worker reads on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from infra.kafka.clients import make_producer
from infra.secrets import as_tenant
from infra.settings import Settings
from producers.cancel import cancel
from schemas import ChatResponse, DeadLetter, ErrorCode
from tests.helpers import read_topic, wait_for
from tests.integration.inference_support import enriched, feed
from tests.integration.pipeline_support import (
    Pipeline,
    running_with_gateway,
)
from tests.provision import KafkaService, PostgresService

KEY = "sk-cancel-" + uuid.uuid4().hex
TENANT = "cancelco"
MAX_TOKENS = 400
#: SmolLM2 goes on for hundreds of tokens on this (greedy decoding).
TALKY = "Write a very long story about a dragon who learns to cook. Describe every dish in detail."


@dataclass
class Stack:
    url: str
    settings: Settings
    pipeline: Pipeline


@pytest.fixture(scope="module")
async def stack(
    kafka: KafkaService, postgres: PostgresService, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("cancel")
    async with running_with_gateway(
        kafka, postgres, root, keys=[(KEY, TENANT, "alice")], tenants=(TENANT,)
    ) as (url, p):
        yield Stack(url, p.settings, p)


async def _all(s: Settings) -> list[ChatResponse]:
    """Every committed response on the tenant's chat responses topic."""
    records = await read_topic(s, s.topics.tenant(TENANT).responses("chat"))
    return [ChatResponse.model_validate_json(record.value) for record in records]


async def _responses(s: Settings, request_id: str) -> list[ChatResponse]:
    """The committed responses to `request_id`."""
    return [r for r in await _all(s) if r.request_id == request_id]


async def _answered(s: Settings, request_id: str, timeout: float = 240) -> list[ChatResponse]:
    async def check() -> list[ChatResponse]:
        return await _responses(s, request_id)

    return await wait_for(check, timeout=timeout, interval=1.0, what=f"the response to {request_id}")


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


async def test_a_stream_closed_early_stops_its_generation(stack: Stack) -> None:
    body = {
        "model": "ragbus",
        "messages": [{"role": "user", "content": TALKY}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
    }
    pieces: list[str] = []
    async with (
        httpx.AsyncClient(timeout=240) as http,
        http.stream("POST", f"{stack.url}/v1/chat/completions", json=body, headers=_headers()) as resp,
    ):
        assert resp.status_code == 200, await resp.aread()
        request_id = resp.headers["x-request-id"]
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            content = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
            if content:
                pieces.append(content)
            if len(pieces) >= 3:
                break  # leaving the block closes the connection mid-stream
    assert len(pieces) >= 3, pieces

    (answer, *more) = await _answered(stack.settings, request_id)
    stack.pipeline.assert_alive()
    assert answer.error is not None and answer.error.code == ErrorCode.CANCELLED, answer
    assert answer.finish_reason == "error" and "client_disconnected" in answer.error.message
    # Stopped early: far fewer tokens than asked for (and at least those the client saw).
    assert 3 <= answer.usage.completion_tokens < MAX_TOKENS // 2, answer.usage
    print(f"cancelled after {answer.usage.completion_tokens} of {MAX_TOKENS} tokens: {answer.error.message}")
    assert answer.answer.startswith("".join(pieces).strip()[:10]), (answer.answer, pieces)
    assert more == [], "answered more than once"

    # The worker goes on serving.
    async with httpx.AsyncClient(timeout=240) as http:
        hello = {"model": "ragbus", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
        follow = await http.post(f"{stack.url}/v1/chat/completions", json=hello, headers=_headers())
    assert follow.status_code == 200, follow.text
    assert follow.json()["choices"][0]["message"]["content"]
    # Still exactly one response to the cancelled request.
    assert len(await _responses(stack.settings, request_id)) == 1


async def test_a_dropped_connection_cancels_a_waiting_request(stack: Stack) -> None:
    """Not streaming: the client gives up while the gateway waits for the answer."""
    s = stack.settings
    before = {r.request_id for r in await _all(s)}
    body = {"model": "ragbus", "messages": [{"role": "user", "content": TALKY}], "max_tokens": MAX_TOKENS}
    async with httpx.AsyncClient(timeout=240) as http:
        asking = asyncio.create_task(
            http.post(f"{stack.url}/v1/chat/completions", json=body, headers=_headers())
        )
        await asyncio.sleep(3)
        assert not asking.done(), asking.result()
        asking.cancel()  # the connection closes with the task
        with contextlib.suppress(asyncio.CancelledError):
            await asking

    async def cancelled() -> list[ChatResponse]:
        return [r for r in await _all(s) if r.request_id not in before]

    (answer, *more) = await wait_for(
        cancelled, timeout=240, interval=1.0, what="the dropped request's answer"
    )
    assert answer.error is not None and answer.error.code == ErrorCode.CANCELLED, answer
    assert "client_disconnected" in answer.error.message
    # Stopped before its end (how far it got depends on the machine's speed and load).
    assert answer.usage.completion_tokens < MAX_TOKENS, answer.usage
    assert more == []


async def test_a_request_cancelled_before_it_arrives_is_not_generated(stack: Stack) -> None:
    s = stack.settings
    event = enriched(TALKY, tenant=TENANT, max_tokens=MAX_TOKENS)
    # The Batch API's way in: cancel by request id, as the tenant.
    assert await cancel(as_tenant(s, TENANT), [event.request_id], reason="batch_cancelled") == 1
    await feed(s, [event])

    (answer, *more) = await _answered(s, event.request_id)
    assert answer.error is not None and answer.error.code == ErrorCode.CANCELLED, answer
    assert "batch_cancelled" in answer.error.message and "before it was generated" in answer.error.message
    assert answer.usage.completion_tokens == 0 and answer.model is None and answer.answer == ""
    assert more == []
    stack.pipeline.assert_alive()


async def test_a_malformed_cancel_is_dead_lettered_and_reading_goes_on(stack: Stack) -> None:
    s = stack.settings
    topic = s.topics.tenant(TENANT).cancel
    producer = make_producer(s)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b'{"not": "a cancel"}', key=b"junk")
    finally:
        await producer.stop()
    dlq = s.topics.dlq_of("chat.cancel")

    async def dead_letters() -> list[DeadLetter]:
        letters = [DeadLetter.model_validate_json(r.value) for r in await read_topic(s, dlq)]
        return [d for d in letters if d.source_topic == topic]

    (letter, *_) = await wait_for(dead_letters, timeout=60, what="the malformed cancel's dead letter")
    assert letter.error_class == "schema_validation" and letter.original_value == b'{"not": "a cancel"}'

    # A valid cancel after it still counts.
    event = enriched(TALKY, tenant=TENANT, max_tokens=MAX_TOKENS)
    await cancel(as_tenant(s, TENANT), [event.request_id])
    await feed(s, [event])
    (answer, *_) = await _answered(s, event.request_id)
    assert answer.error is not None and answer.error.code == ErrorCode.CANCELLED
    stack.pipeline.assert_alive()
