"""Exactly-once output for every consuming component: results and consumed offsets in one Kafka
transaction, with one policy for fencing, aborts, rebalances and retries.

Components read their input however suits them (the processors through faust, the worker with
its own polling task) but never commit an offset themselves. Each processed micro-batch is handed
here as (record, outputs) pairs; a single publisher task writes the outputs of everything queued
so far and the next offset of every consumed partition in one transaction of one transactional
producer, then commits it. Readers with isolation_level=read_committed therefore see each input's
outputs exactly once: a crash before the commit aborts the outputs together with the offsets, and
the records are read again.

The policy, in one place: a transaction that aborts (a broker error) is retried as it was, up to
`max_attempts`; being fenced (another process took this transactional id) or running out of
attempts fails the publisher, and the component stops so that its restart resumes from the
committed offsets. Results a rebalance overtook are dropped, not committed (`stale_reason`).

Why not faust's own `processing_guarantee="exactly_once"` for the processors: in faust-streaming
0.15.3 it picks the transactional producer by the *destination* partition and only for topics the
consumer itself subscribes to; records sent to any other topic (here: every output topic) go
through the plain producer, outside any transaction. Checked here: with it enabled, the records an
agent sent to another topic were written without transaction markers (visible at once to
read_committed readers, whatever happened to the offsets).

Fencing: the producer's transactional id is stable across restarts of the same deployment (see
`infra.kafka.clients.transactional_id`), so a restarted process fences its crashed predecessor and waits
for its open transaction to finish before the consumer reads the committed offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from infra.kafka.clients import make_producer
from infra.kafka.codec import Output, RecordLike
from infra.settings import Settings

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """Results could not be committed; the process must stop and resume from committed offsets."""


@dataclass
class _Item:
    pairs: list[tuple[RecordLike, list[Output]]]
    done: asyncio.Future[None]


@dataclass
class PublisherStats:
    transactions: int = 0
    records: int = 0
    outputs: int = 0
    retries: int = 0
    dropped: int = 0
    last_commit_ms: float = 0.0
    commit_ms_total: float = field(default=0.0)


class TransactionalPublisher:
    def __init__(
        self,
        settings: Settings,
        *,
        group_id: str,
        transactional_id: str,
        client_id: str,
        generation: Callable[[], int | None] | None = None,
        max_attempts: int = 4,
        max_records_per_transaction: int = 5000,
        commit_timeout_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.group_id = group_id
        self.transactional_id = transactional_id
        self.client_id = client_id
        #: The consumer group's current generation (records of an older one are not committed).
        self.generation = generation
        self.max_attempts = max_attempts
        self.max_records = max_records_per_transaction
        #: Longest one transaction (sends, offsets, commit) may take before the publisher fails.
        self.commit_timeout_s = (
            commit_timeout_s if commit_timeout_s is not None else settings.kafka_commit_timeout_s
        )
        self.stats = PublisherStats()
        #: Set (with the error) when results can no longer be committed.
        self.failed: asyncio.Future[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._queue: list[_Item] = []
        self._inflight: list[_Item] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        #: Next offset to process per partition, as committed by this publisher.
        self._committed: dict[TopicPartition, int] = {}
        self._revoked: set[TopicPartition] = set()

    async def start(self) -> None:
        """Start the producer. `init_transactions` fences a predecessor with the same id and waits
        for its open transaction to end, so call this before the consumer reads committed offsets."""
        self.failed = asyncio.get_running_loop().create_future()
        self._producer = make_producer(
            self.settings, client_id=self.client_id, transactional_id=self.transactional_id
        )
        await self._producer.start()
        self._task = asyncio.create_task(self._run(), name=f"{self.client_id}-publisher")
        log.info("publisher ready (transactional id %s, group %s)", self.transactional_id, self.group_id)

    async def stop(self) -> None:
        with contextlib.suppress(PublishError):
            await self.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._producer is not None:
            # A stuck broker must not hang the shutdown either (see `_within_deadline`).
            closing = asyncio.ensure_future(self._producer.stop())
            done, _ = await asyncio.wait([closing], timeout=self.commit_timeout_s)
            if not done:
                closing.cancel()
                log.warning("the transactional producer did not stop within %g s", self.commit_timeout_s)
            closing.add_done_callback(_consume_result)
        for item in self._queue:
            if not item.done.done():
                item.done.set_exception(PublishError("publisher stopped"))
        self._queue.clear()

    # --- used by the stages ------------------------------------------------------------------
    def submit(self, pairs: Sequence[tuple[RecordLike, list[Output]]]) -> asyncio.Future[None]:
        """Queue the outputs of consumed records; the future resolves once they are committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.failed is not None and self.failed.done():
            done.set_exception(PublishError("the publisher has failed"))
            return done
        self._queue.append(_Item(list(pairs), done))
        self._idle.clear()
        self._wakeup.set()
        return done

    async def drain(self) -> None:
        """Wait until everything submitted so far is committed (or the publisher failed)."""
        while self._queue or not self._idle.is_set():
            if self.failed is not None and self.failed.done():
                raise PublishError("the publisher has failed") from self.failed.exception()
            idle = asyncio.ensure_future(self._idle.wait())
            waiters: list[asyncio.Future[None]] = [idle]
            if self.failed is not None:
                waiters.append(self.failed)
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Commit what was processed for the partitions going away, then forget them."""
        tps = {TopicPartition(tp.topic, tp.partition) for tp in revoked}
        with contextlib.suppress(PublishError):
            await self.drain()
        self._revoked |= tps
        for tp in tps:
            self._committed.pop(tp, None)

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._revoked -= {TopicPartition(tp.topic, tp.partition) for tp in assigned}

    # --- the publishing task -------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._queue:
                    self._inflight = self._take()
                    await self._commit(self._inflight)
                    for item in self._inflight:
                        if not item.done.done():
                            item.done.set_result(None)
                    self._inflight = []
                self._idle.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("publisher failed: results cannot be committed")
            self._fail(e)

    def _take(self) -> list[_Item]:
        items, records = [], 0
        while self._queue and (not items or records + len(self._queue[0].pairs) <= self.max_records):
            item = self._queue.pop(0)
            items.append(item)
            records += len(item.pairs)
        return items

    async def _commit(self, items: list[_Item]) -> None:
        outputs: list[Output] = []
        offsets: dict[TopicPartition, int] = {}
        generation = self._current_generation()
        for item in items:
            for record, produced in item.pairs:
                stale = self.stale_reason(record, generation)
                if stale:
                    self.stats.dropped += 1
                    log.warning(
                        "not committing %s/%d@%d (%s): it will be processed again",
                        record.topic,
                        record.partition,
                        record.offset,
                        stale,
                    )
                    continue
                outputs.extend(produced)
                tp = _tp(record)
                offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        if not offsets:
            return
        for attempt in range(1, self.max_attempts + 1):
            started = time.perf_counter()
            try:
                await self._within_deadline(self._transaction(outputs, offsets))
            except ProducerFenced as e:
                raise PublishError(
                    f"fenced: another processor with transactional id {self.transactional_id} started"
                ) from e
            except KafkaError as e:
                if attempt == self.max_attempts:
                    raise PublishError(f"transaction failed {attempt} times: {e!r}") from e
                self.stats.retries += 1
                log.warning("transaction aborted (%r); retrying (%d/%d)", e, attempt, self.max_attempts - 1)
                await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
                continue
            elapsed = (time.perf_counter() - started) * 1000
            self.stats.transactions += 1
            self.stats.records += sum(len(i.pairs) for i in items)
            self.stats.outputs += len(outputs)
            self.stats.last_commit_ms = elapsed
            self.stats.commit_ms_total += elapsed
            self.note_committed(offsets)
            return

    def note_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            self._committed[tp] = max(self._committed.get(tp, 0), offset)

    def _current_generation(self) -> int | None:
        return self.generation() if self.generation is not None else None

    def stale_reason(self, record: RecordLike, generation: int | None = None) -> str | None:
        """Why a processed record must not be committed (None: it may). `generation` defaults to
        the group's current one.

        A rebalance can overtake a batch in flight: its partitions may have moved to another
        member (which reads them again from the committed offset) or come back to this one (which
        reads them again too). Committing such a batch would duplicate its outputs.
        """
        if generation is None:
            generation = self._current_generation()
        tp = _tp(record)
        fetched_in = getattr(record, "generation", None)  # known for the records faust hands over
        if tp in self._revoked:
            return "partition revoked"
        if generation is not None and fetched_in is not None and fetched_in != generation:
            return f"fetched in group generation {fetched_in}, now {generation}"
        if record.offset < self._committed.get(tp, -1):
            return "already committed"
        return None

    async def _within_deadline(self, transaction: Coroutine[Any, Any, None]) -> None:
        """Run `transaction`, failing the publisher when it does not end within commit_timeout_s.

        A broker or coordinator that stops answering would otherwise hang the commit (and the
        component with it) for good. asyncio.wait, not wait_for: wait_for would wait for the
        cancelled transaction to unwind, which may hang just the same. The producer is left as it
        is: the component stops, and its restart fences this transactional id and resumes from the
        committed offsets (the coordinator aborts the open transaction).
        """
        task = asyncio.ensure_future(transaction)
        done, _ = await asyncio.wait([task], timeout=self.commit_timeout_s)
        if not done:
            task.cancel()
            task.add_done_callback(_consume_result)
            raise PublishError(
                f"a transaction did not commit within {self.commit_timeout_s:g} s "
                f"(transactional id {self.transactional_id}); is the Kafka cluster reachable and "
                "healthy? Stopping: a restart resumes from the committed offsets "
                "(RAGBUS_KAFKA_COMMIT_TIMEOUT_S sets the deadline)"
            )
        task.result()

    async def _transaction(self, outputs: list[Output], offsets: dict[TopicPartition, int]) -> None:
        producer = self._producer
        assert producer is not None
        async with producer.transaction():
            for topic, enc in outputs:
                await producer.send(topic, enc.value, key=enc.key, headers=enc.headers)
            await producer.send_offsets_to_transaction(offsets, self.group_id)

    def _fail(self, error: BaseException) -> None:
        wrapped = error if isinstance(error, PublishError) else PublishError(str(error))
        if self.failed is not None and not self.failed.done():
            self.failed.set_exception(wrapped)
        for item in [*self._inflight, *self._queue]:
            if not item.done.done():
                item.done.set_exception(wrapped)
        self._inflight = []
        self._queue.clear()
        self._idle.set()


def _consume_result(task: asyncio.Future[None]) -> None:
    """Retrieve an abandoned transaction's outcome so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _tp(record: RecordLike) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)
