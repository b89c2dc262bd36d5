"""The worker's consumer side: polls both enriched topics without pause for thought, keeps one queue
per lane, and applies back-pressure by pausing partitions.

Polling never waits for generation: it runs in its own task, so heartbeats and the
max.poll.interval.ms clock stay happy however long a batch takes (aiokafka #848). When the requests
held (queued plus generating) reach the limit, bulk partitions pause; chat partitions pause only
`chat_headroom` later, so chat can still overtake a full bulk backlog. Nothing is buffered without
bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from infra.kafka.codec import DecodeError, decode_record
from schemas import EnrichedRequest, Lane

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """One consumed record: its event, or why it could not be decoded."""

    record: Any
    lane: Lane
    event: EnrichedRequest | None
    error: DecodeError | None
    received: float  # wall clock, seconds

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.record.topic, self.record.partition)


@dataclass
class IntakeStats:
    polled: int = 0
    assignments: int = 0
    revocations: int = 0
    pauses: int = 0
    max_held: int = 0


class Intake:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        lanes: dict[str, Lane],
        max_bytes: dict[str, int],
        max_inflight: int,
        chat_headroom: int,
        poll_timeout_ms: int = 100,
    ) -> None:
        self.consumer = consumer
        self.lanes = lanes  # topic -> lane
        self.max_bytes = max_bytes
        self.max_inflight = max_inflight
        self.chat_headroom = chat_headroom
        self.poll_timeout_ms = poll_timeout_ms
        self.queues: dict[Lane, deque[Pending]] = {"chat": deque(), "bulk": deque()}
        self.generating = 0
        self.stats = IntakeStats()
        self._arrived = asyncio.Event()
        self._paused: set[TopicPartition] = set()

    # --- what is held -----------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self.queues["chat"]) + len(self.queues["bulk"])

    @property
    def held(self) -> int:
        return self.queued + self.generating

    # --- polling -----------------------------------------------------------------------------
    async def poll_once(self) -> int:
        room = max(1, self.max_inflight + self.chat_headroom - self.held)
        batches = await self.consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=room)
        now = time.time()
        n = 0
        for tp, records in batches.items():
            lane = self.lanes[tp.topic]
            for record in records:
                try:
                    event: EnrichedRequest | None = decode_record(
                        record, EnrichedRequest, max_bytes=self.max_bytes[tp.topic]
                    )
                    error = None
                except DecodeError as e:
                    event, error = None, e
                self.queues[lane].append(Pending(record, lane, event, error, now))
                n += 1
        if n:
            self.stats.polled += n
            self.stats.max_held = max(self.stats.max_held, self.held)
            self._arrived.set()
        self.apply_backpressure()
        return n

    def apply_backpressure(self) -> None:
        """Pause what must wait, resume what may flow again."""
        assigned = self.consumer.assignment()
        want: set[TopicPartition] = set()
        for tp in assigned:
            limit = self.max_inflight + (self.chat_headroom if self.lanes[tp.topic] == "chat" else 0)
            if self.held >= limit:
                want.add(tp)
        pause = want - self._paused
        resume = (self._paused - want) & assigned
        if pause:
            self.consumer.pause(*pause)
            self.stats.pauses += 1
            log.info("holding %d requests: paused %s", self.held, _names(pause))
        if resume:
            self.consumer.resume(*resume)
            log.info("holding %d requests: resumed %s", self.held, _names(resume))
        self._paused = want & assigned

    # --- handing out work --------------------------------------------------------------------
    async def wait_for_work(self, max_batch: int, max_wait_s: float, stop: asyncio.Event) -> None:
        """Return once something is queued and either `max_batch` are or `max_wait_s` passed."""
        while not self.queued and not stop.is_set():
            self._arrived.clear()
            await _wait(self._arrived, 0.5)
        # The window runs from the oldest queued request's arrival: a request that queued while
        # the previous batch generated has waited long enough already.
        oldest = min((q[0].received for q in self.queues.values() if q), default=time.time())
        deadline = oldest + max_wait_s
        while self.queued < max_batch and not stop.is_set():
            left = deadline - time.time()
            if left <= 0:
                break
            self._arrived.clear()
            await _wait(self._arrived, left)

    def take(self, max_batch: int) -> list[Pending]:
        """Up to `max_batch` requests: chat first, topped up from bulk (FIFO within a lane, so
        each partition's records leave in offset order)."""
        out: list[Pending] = []
        for lane in ("chat", "bulk"):
            q = self.queues[lane]
            while q and len(out) < max_batch:
                out.append(q.popleft())
        self.generating += len(out)
        return out

    def finished(self, n: int) -> None:
        self.generating -= n
        self.apply_backpressure()

    def drop(self, partitions: Iterable[TopicPartition]) -> int:
        """Forget queued records of `partitions` (revoked, or rewound after an abort)."""
        gone = set(partitions)
        dropped = 0
        for lane, q in self.queues.items():
            kept = deque(p for p in q if p.tp not in gone)
            dropped += len(q) - len(kept)
            self.queues[lane] = kept
        self._paused -= gone
        return dropped


class Rebalance(ConsumerRebalanceListener):
    """Revocation waits for the batch in flight to commit, then drops what was queued from the
    revoked partitions (their next owner reads them from the committed offsets)."""

    def __init__(
        self, intake: Intake, batch_lock: asyncio.Lock, on_change: Callable[[], Awaitable[None]]
    ) -> None:
        self.intake = intake
        self.lock = batch_lock
        self.on_change = on_change

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if not revoked:
            return
        self.intake.stats.revocations += 1
        async with self.lock:
            dropped = self.intake.drop(revoked)
        log.info("partitions revoked: %s (%d queued records dropped)", _names(revoked), dropped)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.intake.stats.assignments += 1
        log.info("partitions assigned: %s", _names(assigned) or "none")
        await self.on_change()


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


def _names(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps))
