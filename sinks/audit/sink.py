"""The audit sink's consumer loop: every `<prefix>.*` topic → `audit_log`.

A plain aiokafka loop rather than the transactional publisher the processors and the worker commit
through: the output is a Postgres transaction, not Kafka records, so exactly-once comes from
idempotent writes instead — offsets are committed only after the rows' transaction has committed,
and a replay (crash, rebalance) re-inserts rows that `ON CONFLICT DO NOTHING` drops.

- One consumer group, `<prefix>.audit`, subscribed by regex to every topic under the prefix, DLQs
  included; a short metadata refresh picks up topics created later.
- Fetch/map and write overlap: the loop maps batch n+1 while a writer task stores batch n.
  Batches are written and committed strictly in fetch order, so a committed offset never runs
  ahead of a row that is not yet stored.
- Postgres down or refusing: the writer retries the same batch with capped exponential backoff;
  meanwhile the loop pauses every assigned partition and keeps polling (so the group membership
  and `max_poll_interval_ms` stay healthy) and resumes once the writer is through. At most
  `MAX_QUEUED` + 2 batches are held in memory (queued, one being written, one waiting for room).
- At rest, offsets are moved past transaction markers, so `ragbus status` shows a lag of 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from infra.kafka.clients import make_consumer
from infra.settings import Settings
from sinks.audit.crypto import Keyring
from sinks.audit.rows import Row, RowMapper
from sinks.audit.writer import AuditWriter

log = logging.getLogger(__name__)

#: Batches mapped and waiting for the writer, besides the one it is writing.
MAX_QUEUED = 2
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 10.0


@dataclass
class Batch:
    rows: list[Row]
    #: Per partition: the offset after the batch's last record.
    offsets: dict[TopicPartition, int]


@dataclass
class SinkStats:
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    replaced: int = 0
    batches: int = 0
    write_failures: int = 0
    commit_failures: int = 0
    pauses: int = 0
    #: Seconds the writer spent in Postgres transactions and in offset commits.
    write_s: float = 0.0
    commit_s: float = 0.0
    started: float = field(default_factory=time.monotonic)


def group_id(settings: Settings) -> str:
    return f"{settings.topic_prefix}.audit"


class _Listener(ConsumerRebalanceListener):
    def __init__(self, sink: AuditSink) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Let queued batches commit their offsets first (fewer replays for the next owner);
        # never wait on a writer that is stuck on Postgres: replays are harmless anyway.
        await self._sink.drain(timeout=10.0)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("audit: assigned %d partitions", len(assigned))


class AuditSink:
    def __init__(
        self,
        settings: Settings,
        *,
        batch_size: int | None = None,
        keyring: Keyring | None = None,
        poll_timeout_ms: int = 200,
        metadata_max_age_ms: int = 5_000,
        log_every_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.batch_size = batch_size or settings.audit_batch_size
        self.keyring = keyring if keyring is not None else Keyring.from_settings(settings)
        self.poll_timeout_ms = poll_timeout_ms
        self.metadata_max_age_ms = metadata_max_age_ms
        self.log_every_s = log_every_s
        self.group_id = group_id(settings)
        self.mapper = RowMapper(settings.topic_prefix, self.keyring)
        dsn = settings.postgres_dsn_for("sink")
        # As its own role (INSERT only) the sink cannot migrate; as the owner (one pg_dsn) it may.
        self.writer = AuditWriter(dsn, may_migrate=dsn == settings.postgres_dsn)
        self.stats = SinkStats()
        self._queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=MAX_QUEUED)
        self._consumer: AIOKafkaConsumer | None = None
        self._writer_ok = True
        self._busy = False
        self._pending: Batch | None = None
        self._committed: dict[TopicPartition, int] = {}
        self._last_idle_commit = 0.0

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self, stop: asyncio.Event | None = None) -> bool:
        """Connect to Postgres and apply migrations, then to Kafka, waiting with backoff while
        either is unavailable. Returns False when `stop` was set first."""
        stop = stop or asyncio.Event()
        delay = BACKOFF_FIRST_S
        while True:
            try:
                await self.writer.prepare()
                break
            except Exception as err:  # noqa: BLE001 - whatever Postgres does, wait and retry
                log.warning("audit: Postgres not ready (%s); retrying in %.1f s", _short(err), delay)
                if await _sleep_or_stop(stop, delay):
                    return False
                delay = min(delay * 2, BACKOFF_MAX_S)
        overrides: dict[str, Any] = {"metadata_max_age_ms": self.metadata_max_age_ms}
        if self.settings.instance_id:
            # Static membership: a restarted sink takes its partitions back at once instead of
            # waiting for the dead member's session to time out.
            overrides["group_instance_id"] = f"{self.group_id}.{self.settings.instance_id}"
        delay = BACKOFF_FIRST_S
        while True:
            consumer = make_consumer(
                self.settings,
                group_id=self.group_id,
                client_id=f"{self.settings.kafka_client_id}-audit",
                **overrides,
            )
            try:
                await consumer.start()
                break
            except KafkaError as err:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                log.warning("audit: Kafka not reachable (%s); retrying in %.1f s", _short(err), delay)
                if await _sleep_or_stop(stop, delay):
                    await self.writer.close()
                    return False
                delay = min(delay * 2, BACKOFF_MAX_S)
        self._consumer = consumer
        self._consumer.subscribe(pattern=self.settings.topics.pattern, listener=_Listener(self))
        log.info(
            "audit: consuming %s as group %s into Postgres%s",
            self.settings.topics.pattern,
            self.group_id,
            f" (encrypting with key {self.keyring.primary})" if self.keyring else "",
        )
        return True

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until `stop` is set (or the task is cancelled), then finish what was fetched
        when Postgres allows it."""
        stop = stop or asyncio.Event()
        if self._consumer is None and not await self.start(stop):
            return
        writer = asyncio.create_task(self._write_loop(), name="audit-writer")
        last_log = time.monotonic()
        try:
            while not stop.is_set():
                if writer.done():
                    writer.result()  # raises what killed it
                await self._poll_once()
                if time.monotonic() - last_log >= self.log_every_s:
                    self._log_progress()
                    last_log = time.monotonic()
            if await self.drain(timeout=30.0):
                await self._commit_at_rest(force=True)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            await self.stop()
            self._log_progress()

    async def stop(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None
        await self.writer.close()

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued batch is stored and committed (False: gave up)."""
        deadline = time.monotonic() + timeout
        while self._queue.qsize() or self._busy or self._pending is not None:
            if self._pending is not None and not self._queue.full():
                self._queue.put_nowait(self._pending)
                self._pending = None
                continue
            if not self._writer_ok or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # --- consuming ---------------------------------------------------------------------------
    async def _poll_once(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        if self._pending is not None:
            if not await self._offer(self._pending):
                # Postgres is behind or down: hold every partition and keep polling, which keeps
                # this member in the group without fetching more.
                self._pause_all()
                held = await consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=self.batch_size)
                self._unread(held)
                return
            self._pending = None
        if consumer.paused():
            consumer.resume(*consumer.paused())
            log.info("audit: resuming consumption")
        batches = await consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=self.batch_size)
        # The rows' created_at where the broker did not stamp the records (never the producer's time).
        received = datetime.now(UTC)
        records = [r for recs in batches.values() for r in recs]
        if not records:
            await self._commit_at_rest()
            return
        # Records come in offset order per partition.
        offsets = {tp: recs[-1].offset + 1 for tp, recs in batches.items() if recs}
        self.stats.records += len(records)
        batch = Batch(self.mapper.rows(records, received), offsets)
        if not await self._offer(batch):
            self._pending = batch

    async def _offer(self, batch: Batch) -> bool:
        """Queue `batch` for the writer: wait a little for room while the writer is healthy,
        not at all while it is retrying. False: not queued."""
        if self._writer_ok:
            try:
                await asyncio.wait_for(self._queue.put(batch), 1.0)
                return True
            except TimeoutError:
                return False
        if self._queue.full():
            return False
        self._queue.put_nowait(batch)
        return True

    def _pause_all(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        todo = consumer.assignment() - consumer.paused()
        if todo:
            consumer.pause(*todo)
            self.stats.pauses += 1
            log.info("audit: pausing %d partitions until the writer catches up", len(todo))

    def _unread(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        """Rewind to the first of `fetched` records, so they are read again later."""
        consumer = self._consumer
        assert consumer is not None
        assigned = consumer.assignment()
        for tp, recs in fetched.items():
            if recs and tp in assigned:
                consumer.seek(tp, recs[0].offset)

    async def _commit_at_rest(self, *, force: bool = False) -> None:
        """With nothing queued or being written, every record before each partition's position
        is stored: commit the positions, which also steps over trailing transaction markers."""
        consumer = self._consumer
        assert consumer is not None
        if (
            self._busy
            or self._queue.qsize()
            or self._pending
            or (not force and time.monotonic() - self._last_idle_commit < 1.0)
        ):
            return
        self._last_idle_commit = time.monotonic()
        offsets = {}
        for tp in consumer.assignment():
            try:
                position = await asyncio.wait_for(consumer.position(tp), 1.0)
            except (TimeoutError, KafkaError, AssertionError):
                continue
            if self._committed.get(tp) != position:
                offsets[tp] = position
        if offsets and not self._busy and not self._queue.qsize():
            await self._commit(offsets)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        mine = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not mine:
            return
        try:
            await consumer.commit(mine)
            self._committed.update(mine)
        except KafkaError as err:
            # The rows are stored; the next owner re-reads them and ON CONFLICT drops them.
            self.stats.commit_failures += 1
            log.warning("audit: offset commit failed (%s); the records will be replayed", _short(err))

    # --- writing -----------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        while True:
            batch = await self._queue.get()
            self._busy = True
            try:
                t0 = time.perf_counter()
                await self._store(batch)
                t1 = time.perf_counter()
                await self._commit(batch.offsets)
                self.stats.write_s += t1 - t0
                self.stats.commit_s += time.perf_counter() - t1
            finally:
                self._busy = False
                self._queue.task_done()

    async def _store(self, batch: Batch) -> None:
        delay = BACKOFF_FIRST_S
        while True:
            try:
                result = await self.writer.write(batch.rows)
            except Exception as err:  # noqa: BLE001 - down, refusing or slow: pause and retry
                self.stats.write_failures += 1
                if self._writer_ok:
                    log.error("audit: writing to Postgres failed (%s); pausing consumption", _short(err))
                else:
                    log.warning("audit: Postgres still unavailable (%s); retry in %.1f s", _short(err), delay)
                self._writer_ok = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            if not self._writer_ok:
                log.info("audit: Postgres is back; the batch of %d rows is stored", len(batch.rows))
            self._writer_ok = True
            self.stats.batches += 1
            self.stats.inserted += result.inserted
            self.stats.duplicates += result.duplicates
            self.stats.replaced += result.replaced
            return

    def _log_progress(self) -> None:
        s = self.stats
        elapsed = max(time.monotonic() - s.started, 1e-9)
        log.info(
            "audit: %d records, %d rows inserted, %d replays skipped, %d unstorable, %.0f records/s",
            s.records,
            s.inserted,
            s.duplicates,
            s.replaced,
            s.records / elapsed,
        )


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:300]


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> bool:
    """Sleep `delay` seconds; True when `stop` was set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()
