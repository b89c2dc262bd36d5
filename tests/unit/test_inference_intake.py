"""The worker's intake: chat-first batches, per-lane FIFO, pausing at the in-flight limit
(a stand-in consumer: this is the pure bookkeeping, the real broker is in the integration tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from inference_workers.worker.intake import Intake
from infra.kafka.codec import encode
from schemas import ChatRequest, EnrichedRequest

CHAT, BULK = "p.chat.enriched", "p.bulk.enriched"


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes = b"k"
    headers: list[Any] = field(default_factory=list)
    timestamp: int = 1


class Consumer:
    def __init__(self) -> None:
        self.assigned = {TopicPartition(CHAT, 0), TopicPartition(BULK, 0)}
        self.paused: set[TopicPartition] = set()
        self.pending: dict[TopicPartition, list[Record]] = {tp: [] for tp in self.assigned}
        self.asked: list[int] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        self.asked.append(max_records)
        out: dict[TopicPartition, list[Record]] = {}
        for tp, recs in self.pending.items():
            if tp in self.paused:
                continue
            take = recs[: max_records - sum(len(v) for v in out.values())]
            if take:
                out[tp] = take
                del recs[: len(take)]
        return out

    def add(self, topic: str, n: int) -> None:
        tp = TopicPartition(topic, 0)
        for _ in range(n):
            lane = "chat" if topic == CHAT else "bulk"
            req = ChatRequest(tenant_id="t", lane=lane, question="q")  # type: ignore[arg-type]
            ev = EnrichedRequest(**req.envelope(), request=req)
            offset = len(self.pending[tp]) + 1000 * (topic == BULK)
            self.pending[tp].append(Record(topic, 0, offset, encode(ev).value))


def intake(consumer: Consumer, *, max_inflight: int = 100, headroom: int = 4) -> Intake:
    return Intake(
        consumer,  # type: ignore[arg-type]
        lanes={CHAT: "chat", BULK: "bulk"},
        max_bytes={CHAT: 1 << 20, BULK: 1 << 20},
        max_inflight=max_inflight,
        chat_headroom=headroom,
    )


async def test_batches_fill_from_chat_first_and_keep_offset_order() -> None:
    c = Consumer()
    c.add(BULK, 5)
    c.add(CHAT, 3)
    it = intake(c)
    await it.poll_once()
    batch = it.take(4)
    assert [p.lane for p in batch] == ["chat", "chat", "chat", "bulk"]
    assert [p.record.offset for p in batch if p.lane == "chat"] == [0, 1, 2]
    assert [p.record.offset for p in it.take(10)] == [1001, 1002, 1003, 1004]
    assert it.held == 8 and it.queued == 0


async def test_bulk_pauses_at_the_limit_chat_gets_headroom_then_both_resume() -> None:
    c = Consumer()
    c.add(BULK, 20)
    it = intake(c, max_inflight=6, headroom=4)
    await it.poll_once()
    assert it.queued == 10  # asked for at most limit + headroom
    assert TopicPartition(BULK, 0) in c.paused and TopicPartition(CHAT, 0) in c.paused
    batch = it.take(4)
    it.finished(0)  # 10 still held (6 queued + 4 generating)
    assert c.paused
    it.finished(len(batch))  # 6 held: chat (limit 10) flows again, bulk (limit 6) still waits
    assert c.paused == {TopicPartition(BULK, 0)}
    it.take(4)
    it.finished(4)
    assert c.paused == set()


async def test_undecodable_records_queue_in_order_with_their_error() -> None:
    c = Consumer()
    c.add(CHAT, 1)
    c.pending[TopicPartition(CHAT, 0)].append(Record(CHAT, 0, 1, b"not json"))
    c.add(CHAT, 1)
    it = intake(c)
    await it.poll_once()
    batch = it.take(10)
    assert [p.error is None for p in batch] == [True, False, True]
    assert batch[1].error is not None and batch[1].error.error_class == "not_json"


async def test_drop_forgets_a_revoked_partition() -> None:
    c = Consumer()
    c.add(CHAT, 2)
    c.add(BULK, 2)
    it = intake(c)
    await it.poll_once()
    assert it.drop([TopicPartition(BULK, 0)]) == 2
    assert [p.lane for p in it.take(10)] == ["chat", "chat"]
