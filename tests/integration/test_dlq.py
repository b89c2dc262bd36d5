"""Bad bytes never stop a partition: each lands on the topic's DLQ with the reason, the
requester (when the bytes name one) gets an error response, and the records after it are
processed normally."""

from __future__ import annotations

import asyncio
import base64
import json

from aiokafka import TopicPartition

from infra.kafka.clients import make_consumer, make_producer
from infra.kafka.codec import encode
from infra.kafka.stage import Incoming, TransactionalStage
from infra.settings import Settings
from schemas import ChatRequest, ChatResponse, DeadLetter, ErrorCode
from tests.helpers import read_events, wait_for


async def test_garbage_goes_to_the_dlq_and_the_consumer_keeps_going(settings: Settings) -> None:
    topics = settings.topics
    requests, responses = topics.requests("chat"), topics.responses("chat")

    async def handler(batch: list[Incoming[ChatRequest]]) -> list:  # type: ignore[type-arg]
        out: list = []  # type: ignore[type-arg]
        for item in batch:
            req = item.event
            if req.question == "boom":
                out.append(ValueError("the handler cannot answer 'boom'"))
                continue
            resp = ChatResponse(**req.envelope(), answer=req.question.upper(), finish_reason="stop")
            out.append([(responses, encode(resp))])
        return out

    stage = TransactionalStage(settings, name="echo", topics=[requests], model=ChatRequest, handler=handler)
    first = ChatRequest(question="first", tenant_id="acme", request_id="r-first")
    last = ChatRequest(question="last", tenant_id="acme", request_id="r-last")
    boom = ChatRequest(question="boom", tenant_id="acme", request_id="r-boom")
    bad_schema = json.dumps(
        {"request_id": "r-bad", "tenant_id": "acme", "lane": "chat", "question": ""}
    ).encode()
    garbage = {
        "not_json": b"this is not json {",
        "schema_validation": bad_schema,
        "invalid_utf8": b'{"question": "\xc3\x28"}',
        "too_large": b'{"question": "' + b"x" * (2 * 1024 * 1024) + b'"}',
    }
    producer = make_producer(settings)
    await producer.start()
    try:
        sends = [encode(first).value, *garbage.values(), encode(boom).value, encode(last).value]
        for value in sends:
            await producer.send_and_wait(requests, value, key=b"same-partition", partition=0)
    finally:
        await producer.stop()

    stop = asyncio.Event()
    task = asyncio.create_task(stage.run(stop))
    try:
        got = await wait_for(
            lambda: _responses_for(settings, responses, {"r-first", "r-last", "r-bad"}),
            what="responses for the valid requests and the rejected one",
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

    assert got["r-first"].answer == "FIRST" and got["r-last"].answer == "LAST"
    rejected = got["r-bad"]
    assert rejected.error is not None and rejected.error.code == ErrorCode.INVALID_REQUEST
    assert "question" in rejected.error.message

    letters = await read_events(settings, topics.dlq(requests), DeadLetter)
    by_class = {d.error_class: d for d in letters}
    assert set(by_class) == {*garbage, "processing"}
    for error_class, raw in garbage.items():
        letter = by_class[error_class]
        assert letter.original_value == raw
        assert letter.source_topic == requests and letter.source_partition == 0
        assert letter.stage == f"{settings.topic_prefix}.echo"
        assert letter.error_message
    assert by_class["processing"].request_id == "r-boom"
    assert "cannot answer" in by_class["processing"].error_message
    assert by_class["schema_validation"].request_id == "r-bad"
    # On the wire, a DeadLetter's original bytes are base64.
    wire = json.loads(by_class["invalid_utf8"].model_dump_json())
    assert base64.b64decode(wire["original_value"]) == garbage["invalid_utf8"]

    # Every record was consumed and its offset committed with the outputs.
    consumer = make_consumer(settings, group_id=stage.group_id)
    await consumer.start()
    try:
        tp = TopicPartition(requests, 0)
        assert await consumer.committed(tp) == len(sends)
    finally:
        await consumer.stop()
    assert stage.stats.dead_letters == 5 and stage.stats.aborted == 0


async def _responses_for(settings: Settings, topic: str, wanted: set[str]) -> dict[str, ChatResponse] | None:
    found = {r.request_id: r for r in await read_events(settings, topic, ChatResponse, timeout=3)}
    return found if wanted <= set(found) else None
