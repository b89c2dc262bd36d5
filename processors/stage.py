"""What every processor stage does with a micro-batch of records, whatever the stage computes:
decode each record (bad bytes become dead letters, never exceptions), hand the valid events to
the stage, turn per-event failures into dead letters plus a reply to whoever is waiting, and
queue all of it with the consumed offsets for one transactional commit.

A stage works in two halves: `prepare` (the model: embedding) and `finish` (Milvus, building the
outputs). The halves of consecutive batches overlap — batch n+1 is embedded while batch n is
searched and committed — and `finish` runs strictly in batch order, so outputs and offsets stay
in order. On a 2-core machine the overlap keeps both cores busy where a plain loop would leave one
idle during each search.

faust owns the consumer (group membership, fetching, micro-batches), so this class only gets the
batches; the commit goes through `infra.kafka.publisher.TransactionalPublisher`, the same one the
inference worker commits through.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from infra.kafka.codec import DecodeError, Output, decode_record
from infra.kafka.dlq import encode_dead_letter, tenant_mismatch
from infra.kafka.publisher import TransactionalPublisher
from infra.settings import Settings
from processors.records import RecordView
from schemas import EventBase
from schemas.topics import max_event_bytes

log = logging.getLogger(__name__)

E = TypeVar("E", bound=EventBase)

#: Per valid event: the records to publish, or the exception that makes it a dead letter.
Result = Sequence[Output] | BaseException


@dataclass(frozen=True)
class Incoming(Generic[E]):
    record: RecordView
    event: E


@dataclass
class StageCounters:
    batches: int = 0
    records: int = 0
    dead_letters: int = 0


@dataclass
class _Batch(Generic[E]):
    records: Sequence[RecordView]
    outputs: list[list[Output]]
    valid: list[tuple[int, Incoming[E]]]
    prepared: Any = None
    failed: BaseException | None = None


class BatchStage(ABC, Generic[E]):
    model: type[E]

    def __init__(self, settings: Settings, publisher: TransactionalPublisher, *, name: str) -> None:
        self.settings = settings
        self.publisher = publisher
        self.name = name
        #: Written into dead letters as the stage that gave up.
        self.stage_id = f"{settings.topic_prefix}.processors.{name}"
        self.counters = StageCounters()
        self._previous: asyncio.Future[None] | None = None  # the last batch's commit
        self._tail: asyncio.Task[None] | None = None  # the last batch's `finish`
        self._preparing = asyncio.Event()
        self._preparing.set()

    async def prepare(self, batch: list[Incoming[E]]) -> Any:
        """First half (may overlap the previous batch's `finish`). Must not raise for one event."""
        return None

    @abstractmethod
    async def finish(self, batch: list[Incoming[E]], prepared: Any) -> list[Result]:
        """Second half: one result per event, in order. Must not raise for a single bad event."""

    @abstractmethod
    def reject(self, record: RecordView, error: BaseException, event: E | None) -> list[Output]:
        """Dead letter plus the reply owed to the requester, for a record this stage gave up on."""

    def dead_letter(self, record: RecordView, error: BaseException) -> Output:
        return encode_dead_letter(record, error, stage=self.stage_id)

    def max_bytes(self, topic: str) -> int:
        return max_event_bytes(topic, self.settings.topic_prefix)

    async def process(self, records: Sequence[RecordView]) -> None:
        """Decode and prepare one micro-batch, then leave its second half running.

        Returns once the previous batch's second half is done and this one's has started, so the
        next batch can be prepared meanwhile. Raises (stopping the agent) when an earlier batch
        could not be committed.
        """
        self._preparing.clear()
        try:
            batch = self._decode(records)
            if batch.valid:
                try:
                    batch.prepared = await self.prepare([item for _, item in batch.valid])
                except Exception as err:  # redone event by event in `_finish`
                    log.exception("%s: preparing a batch of %d failed", self.name, len(batch.valid))
                    batch.failed = err
            if self._tail is not None:
                await asyncio.shield(self._tail)  # a cancelled agent leaves it to finish and commit
            self._tail = asyncio.create_task(self._finish(batch), name=f"{self.name}-finish")
        finally:
            self._preparing.set()

    async def idle(self) -> None:
        """Wait until no batch is in flight (a rebalance lets the batches in flight finish)."""
        await self._preparing.wait()
        if self._tail is not None:
            await asyncio.wait([self._tail])

    def failure(self) -> BaseException | None:
        """Why the last batch's second half failed (then the stage can commit nothing more)."""
        tail = self._tail
        if tail is not None and tail.done() and not tail.cancelled():
            return tail.exception()
        return None

    async def flush(self) -> None:
        """Wait for this stage's last batch to be committed."""
        if self._tail is not None:
            await self._tail
        if self._previous is not None:
            await self._previous

    def _decode(self, records: Sequence[RecordView]) -> _Batch[E]:
        batch: _Batch[E] = _Batch(records, [[] for _ in records], [])
        for i, record in enumerate(records):
            try:
                event = decode_record(record, self.model, max_bytes=self.max_bytes(record.topic))
                # The tenant is the topic's (only its principal writes there), never the payload's.
                mismatch = tenant_mismatch(record.topic, event.tenant_id, self.settings.topic_prefix)
                if mismatch is not None:
                    raise mismatch
            except DecodeError as err:
                batch.outputs[i] = self._give_up(record, err, None)
                continue
            batch.valid.append((i, Incoming(record, event)))
        return batch

    async def _finish(self, batch: _Batch[E]) -> None:
        if batch.valid:
            items = [item for _, item in batch.valid]
            results: list[Result]
            if batch.failed is not None:
                results = await self._one_by_one(items, batch.failed)
            else:
                try:
                    results = await self.finish(items, batch.prepared)
                except Exception as err:
                    log.exception("%s: finishing a batch of %d failed", self.name, len(items))
                    results = await self._one_by_one(items, err)
            if len(results) != len(items):
                log.error(
                    "%s: %d results for %d events; redoing them one by one",
                    self.name,
                    len(results),
                    len(items),
                )
                results = await self._one_by_one(items, RuntimeError("the stage lost track of this event"))
            for (i, item), result in zip(batch.valid, results, strict=True):
                if isinstance(result, BaseException):
                    batch.outputs[i] = self._give_up(item.record, result, item.event)
                else:
                    batch.outputs[i] = list(result)
        self.counters.batches += 1
        self.counters.records += len(batch.records)
        if self._previous is not None:
            await self._previous  # raises PublishError when the commit failed
        self._previous = self.publisher.submit(list(zip(batch.records, batch.outputs, strict=True)))

    async def _one_by_one(self, items: list[Incoming[E]], error: BaseException) -> list[Result]:
        """After a whole batch failed: each event alone, so that only the event that causes the
        failure is dead-lettered (with its own error) and the rest of the batch is answered."""
        if len(items) == 1:
            return [error]
        results: list[Result] = []
        for item in items:
            try:
                prepared = await self.prepare([item])
                (result,) = await self.finish([item], prepared)
            except Exception as err:  # noqa: BLE001 - this event's own failure: dead-lettered
                result = err
            results.append(result)
        return results

    def _give_up(self, record: RecordView, error: BaseException, event: E | None) -> list[Output]:
        """The stage's dead letter and reply for `record`; never raises (a record must not be able
        to stop the partition): should the stage's reply fail, the plain dead letter goes alone."""
        self.counters.dead_letters += 1
        log.warning(
            "%s: %s/%d@%d to the DLQ: %s",
            self.name,
            record.topic,
            record.partition,
            record.offset,
            error if isinstance(error, DecodeError) else f"{type(error).__name__}: {error}",
        )
        try:
            return self.reject(record, error, event)
        except Exception:
            log.exception(
                "%s: no reply for %s/%d@%d", self.name, record.topic, record.partition, record.offset
            )
            return [self.dead_letter(record, error)]
