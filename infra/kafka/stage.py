"""A consume → transform → produce loop with exactly-once output, for components built on
plain aiokafka.

Each polled batch is decoded (bad records are turned into dead letters, never raised), handed to
the component's handler, and everything it produced — outputs, dead letters, error responses to
requesters — is published in one Kafka transaction together with the consumed offsets. A crash
before the commit aborts the transaction and the records are processed again; readers with
isolation_level=read_committed never see the aborted output. A rebalance waits for the batch in
progress to commit, so a partition is never processed by two members at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from infra.kafka.clients import make_consumer, make_producer, transactional_id
from infra.kafka.codec import DecodeError, Encoded, RecordLike, decode_record
from infra.kafka.dlq import encode_dead_letter, rejection_response
from infra.settings import Settings
from schemas import EventBase, spec_for_topic

log = logging.getLogger(__name__)

E = TypeVar("E", bound=EventBase)

Output = tuple[str, Encoded]


@dataclass
class Incoming(Generic[E]):
    record: Any
    event: E


#: Per input event: what to publish, or the exception that makes it a dead letter.
HandlerResult = Sequence[Output] | BaseException
Handler = Callable[[list[Incoming[E]]], Awaitable[list[HandlerResult]]]


@dataclass
class StageStats:
    batches: int = 0
    processed: int = 0
    dead_letters: int = 0
    aborted: int = 0
    last_commit: float = field(default_factory=time.monotonic)


def next_offsets(records: Sequence[RecordLike]) -> dict[TopicPartition, int]:
    """The offsets to commit after `records`: last offset + 1 per partition."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        out[tp] = max(out.get(tp, 0), r.offset + 1)
    return out


class _WaitForBatch(ConsumerRebalanceListener):
    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock = lock

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self._lock:  # the batch in flight commits (or aborts) first
            pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None


class TransactionalStage(Generic[E]):
    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        topics: list[str],
        model: type[E],
        handler: Handler[E],
        respond_to_rejects: bool = True,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
    ) -> None:
        self.settings = settings
        self.name = name
        self.topics = topics
        self.model = model
        self.handler = handler
        self.respond_to_rejects = respond_to_rejects
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.group_id = f"{settings.topic_prefix}.{name}"
        self.stats = StageStats()
        self._lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._max_bytes = {
            t: (spec_for_topic(t, settings.topic_prefix) or _Default).max_event_bytes for t in topics
        }

    async def start(self) -> None:
        self._producer = make_producer(
            self.settings, client_id=self.name, transactional_id=transactional_id(self.settings, self.name)
        )
        self._consumer = make_consumer(self.settings, group_id=self.group_id, client_id=self.name)
        await self._producer.start()
        await self._consumer.start()
        self._consumer.subscribe(self.topics, listener=_WaitForBatch(self._lock))
        log.info("%s: consuming %s as group %s", self.name, ", ".join(self.topics), self.group_id)

    async def stop(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Poll until `stop` is set (or the task is cancelled)."""
        stop = stop or asyncio.Event()
        if self._consumer is None:
            await self.start()
        try:
            while not stop.is_set():
                await self.poll_once()
        finally:
            await self.stop()

    async def poll_once(self) -> int:
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
        records = [r for recs in batches.values() for r in recs]
        if not records:
            return 0
        async with self._lock:
            await self._process(records)
        return len(records)

    async def _process(self, records: list[Any]) -> None:
        good: list[Incoming[E]] = []
        outputs: list[Output] = []
        for record in records:
            try:
                good.append(
                    Incoming(
                        record, decode_record(record, self.model, max_bytes=self._max_bytes[record.topic])
                    )
                )
            except DecodeError as err:
                outputs.extend(self._reject(record, err))
        if good:
            try:
                results = await self.handler(good)
            except Exception as err:
                log.exception("%s: handler failed for a batch of %d", self.name, len(good))
                results = [err] * len(good)
            if len(results) != len(good):
                raise RuntimeError(
                    f"{self.name}: handler returned {len(results)} results for {len(good)} events"
                )
            for item, result in zip(good, results, strict=True):
                if isinstance(result, BaseException):
                    outputs.extend(self._reject(item.record, result))
                else:
                    outputs.extend(result)
        await self._commit(outputs, next_offsets(records))
        self.stats.batches += 1
        self.stats.processed += len(records)

    def _reject(self, record: Any, err: BaseException) -> list[Output]:
        self.stats.dead_letters += 1
        log.warning(
            "%s: %s/%d@%d to the DLQ: %s",
            self.name,
            record.topic,
            record.partition,
            record.offset,
            err if isinstance(err, DecodeError) else f"{type(err).__name__}: {err}",
        )
        out = [encode_dead_letter(record, err, stage=self.group_id)]
        if self.respond_to_rejects:
            response = rejection_response(record, err, topics=self.settings.topics)
            if response is not None:
                out.append(response)
        return out

    async def _commit(self, outputs: list[Output], offsets: dict[TopicPartition, int]) -> None:
        assert self._producer is not None and self._consumer is not None
        try:
            async with self._producer.transaction():
                for topic, enc in outputs:
                    await self._producer.send(topic, enc.value, key=enc.key, headers=enc.headers)
                await self._producer.send_offsets_to_transaction(offsets, self.group_id)
            self.stats.last_commit = time.monotonic()
        except KafkaError:
            self.stats.aborted += 1
            log.exception("%s: transaction aborted; rewinding to the committed offsets", self.name)
            await self._rewind(list(offsets))

    async def _rewind(self, partitions: list[TopicPartition]) -> None:
        assert self._consumer is not None
        await rewind_to_committed(self._consumer, partitions)


async def rewind_to_committed(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
    """Seek each still-assigned partition back to its committed offset (the beginning when none):
    after an aborted transaction, its records are consumed and processed again."""
    assigned = consumer.assignment()
    for tp in partitions:
        if tp not in assigned:
            continue
        committed = await consumer.committed(tp)
        if committed is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, committed)


class _Default:
    max_event_bytes = 1024 * 1024
