"""One reply consumer per client: reads the responses (and token) topics from the moment the
client starts, with no consumer group, and hands each event to whoever waits for its request_id.
Replies nobody waits for (late, or another client's) are dropped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.kafka.clients import make_consumer
from infra.kafka.codec import DecodeError, decode_record
from infra.settings import Settings
from schemas import ChatResponse, TokenChunk, spec_for_topic

log = logging.getLogger(__name__)


class ReplyRouter:
    def __init__(self, settings: Settings, topics: Iterable[str]) -> None:
        self.settings = settings
        self.topics = list(topics)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiters: dict[str, asyncio.Queue[ChatResponse | TokenChunk]] = {}
        self._max = {
            t: (spec_for_topic(t, settings.topic_prefix) or _Any).max_event_bytes for t in self.topics
        }

    async def start(self) -> None:
        consumer = make_consumer(
            self.settings, group_id=None, client_id="ragbus-client", fetch_max_wait_ms=10
        )
        await consumer.start()
        tps: list[TopicPartition] = []
        for topic in self.topics:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer._client.force_metadata_update()  # noqa: SLF001
                parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer.stop()
                raise RuntimeError(
                    f"topic {topic} does not exist (run `ragbus up` or `ragbus topics declare`)"
                )
            tps.extend(TopicPartition(topic, p) for p in parts)
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now, so nothing sent after start() can be missed
            await consumer.position(tp)
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name="ragbus-replies")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    def register(self, request_id: str) -> asyncio.Queue[ChatResponse | TokenChunk]:
        queue: asyncio.Queue[ChatResponse | TokenChunk] = asyncio.Queue()
        self._waiters[request_id] = queue
        return queue

    def unregister(self, request_id: str) -> None:
        self._waiters.pop(request_id, None)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reply consumer failed; retrying")
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                for record in records:
                    self._dispatch(record)

    def _dispatch(self, record: Any) -> None:
        key = record.key.decode("utf-8", "replace") if record.key else None
        if key is not None and key not in self._waiters:
            return  # not ours: skip without parsing
        model: type[ChatResponse] | type[TokenChunk] = (
            TokenChunk if record.topic.endswith(".tokens") else ChatResponse
        )
        try:
            event = decode_record(record, model, max_bytes=self._max[record.topic])
        except DecodeError as e:
            log.warning("undecodable reply at %s/%d@%d: %s", record.topic, record.partition, record.offset, e)
            return
        queue = self._waiters.get(event.request_id)
        if queue is not None:
            queue.put_nowait(event)


class _Any:
    max_event_bytes = 64 * 1024 * 1024
