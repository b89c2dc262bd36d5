"""One event whose handling fails is dead-lettered alone; the rest of its micro-batch is answered
(processors.stage.BatchStage, with a stand-in for the transactional publisher)."""

from __future__ import annotations

import asyncio
from typing import Any

from infra.kafka.codec import Output, encode
from infra.settings import Settings
from processors.records import RecordView
from processors.stage import BatchStage, Incoming, Result
from schemas import ChatRequest, ChatResponse, DeadLetter


class _Publisher:
    """Collects what would be committed."""

    def __init__(self) -> None:
        self.pairs: list[tuple[RecordView, list[Output]]] = []

    def submit(self, pairs: list[tuple[RecordView, list[Output]]]) -> asyncio.Future[None]:
        self.pairs.extend(pairs)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class _Echo(BatchStage[ChatRequest]):
    model = ChatRequest

    async def finish(self, batch: list[Incoming[ChatRequest]], prepared: Any) -> list[Result]:
        if any("poison" in item.event.question for item in batch):
            raise RuntimeError("the store chokes on this batch")
        return [[("answers", encode(ChatResponse(**i.event.envelope(), answer="ok")))] for i in batch]

    def reject(self, record: RecordView, error: BaseException, event: ChatRequest | None) -> list[Output]:
        if event is not None and "unlucky" in event.question:
            raise ValueError("the reply cannot be built either")
        return [self.dead_letter(record, error)]


def _record(offset: int, question: str) -> RecordView:
    value = encode(ChatRequest(tenant_id="acme", request_id=f"r{offset}", question=question)).value
    return RecordView("ragbus.chat.requests", 0, offset, 1, None, value, [])


async def _run(questions: list[str]) -> list[list[Output]]:
    publisher = _Publisher()
    stage = _Echo(Settings(_env_file=None), publisher, name="echo")  # type: ignore[arg-type, call-arg]
    await stage.process([_record(i, q) for i, q in enumerate(questions)])
    await stage.flush()
    assert stage.failure() is None
    assert [r.offset for r, _ in publisher.pairs] == list(range(len(questions)))
    return [outs for _, outs in publisher.pairs]


async def test_a_failing_event_is_dead_lettered_alone() -> None:
    outputs = await _run(["a", "poison", "b"])
    assert [topic for topic, _ in outputs[0]] == ["answers"]
    assert [topic for topic, _ in outputs[2]] == ["answers"]
    ((topic, enc),) = outputs[1]
    assert topic == "ragbus.chat.requests.dlq"
    letter = DeadLetter.model_validate_json(enc.value)
    assert letter.error_class == "processing" and "chokes" in letter.error_message


async def test_a_failing_reply_still_leaves_the_dead_letter() -> None:
    outputs = await _run(["a", "poison, unlucky"])
    assert [topic for topic, _ in outputs[0]] == ["answers"]
    ((topic, enc),) = outputs[1]  # the stage's reply failed: the plain dead letter goes alone
    assert topic == "ragbus.chat.requests.dlq"
    assert DeadLetter.model_validate_json(enc.value).request_id == "r1"
