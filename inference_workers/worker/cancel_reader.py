"""The worker's reader of every tenant's cancel topic, filling its `CancelRegistry`.

Every worker needs every cancel (the request may be on any of them), so this reader has no
consumer group: it assigns itself every partition of every `<prefix>.t.<tenant>.chat.cancel` the
broker has (found through the worker's `TopicDirectory`, again every few seconds, so a tenant added
while the worker runs is read too) and commits nothing. On start it reads back what was published
within `schemas.limits.CANCEL_TTL_S`, so a restarted worker still skips the requests cancelled
before it came up.

A cancel record is untrusted input: it is decoded against the contract with the topic's byte limit,
must name the tenant of the topic it came on, and a record that fails either is dead-lettered
(never raised). Since every worker reads every record, only the worker that owns partition 0 of the
chat enriched topic (exactly one worker at a time outside a rebalance) writes that dead letter, and
only for records that arrived after it started: one written before was its predecessor's to report.

`caught_up` lets a batch wait until the cancels published before it started are read, so a request
cancelled before it reached the worker is skipped, not generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from inference_workers.cancels import CancelRegistry
from infra.kafka.clients import make_consumer, topic_partitions
from infra.kafka.codec import DecodeError, Output, decode_record
from infra.kafka.directory import TopicDirectory
from infra.kafka.dlq import encode_dead_letter, tenant_mismatch
from infra.settings import Settings
from schemas import CancelRequest, limits
from schemas.topics import max_event_bytes, tenant_of

log = logging.getLogger(__name__)

SUFFIX = "chat.cancel"


class CancelReader:
    def __init__(
        self,
        settings: Settings,
        registry: CancelRegistry,
        directory: TopicDirectory,
        *,
        stage: str,
        dead_letter: Callable[[list[Output]], Awaitable[None]],
        on_duty: Callable[[], bool],
        discover_every_s: float = 5.0,
        poll_timeout_ms: int = 100,
    ) -> None:
        """`dead_letter` publishes a malformed cancel's dead letter; `on_duty` says whether this
        worker is the one that does (see the module's docstring)."""
        self.settings = settings
        self.prefix = settings.topic_prefix
        self.registry = registry
        self.directory = directory
        self.stage = stage
        self.dead_letter = dead_letter
        self.on_duty = on_duty
        self.discover_every_s = discover_every_s
        self.poll_timeout_ms = poll_timeout_ms
        self.pattern = re.compile(settings.topics.tenant_pattern(SUFFIX))
        self.dead_letters = 0
        self._consumer: AIOKafkaConsumer | None = None
        #: Per partition, the first offset that arrived after this reader started (older records
        #: are read back for their cancels only, never dead-lettered again).
        self._live_from: dict[TopicPartition, int] = {}
        self._discovered = float("-inf")

    @property
    def partitions(self) -> frozenset[TopicPartition]:
        return frozenset(self._live_from)

    async def start(self) -> None:
        self._consumer = make_consumer(
            self.settings, group_id=None, client_id="worker-cancels", auto_offset_reset="latest"
        )
        await self._consumer.start()
        await self.discover()

    async def stop(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None

    async def run(self, stop: asyncio.Event) -> None:
        """Read cancels until `stop` is set; Kafka errors are logged and retried, never raised."""
        while not stop.is_set():
            try:
                if time.monotonic() - self._discovered >= self.discover_every_s:
                    await self.discover()
                await self.poll_once()
            except KafkaError as e:
                log.warning("reading cancels failed, retrying: %r", e)
                await asyncio.sleep(1)

    async def discover(self) -> int:
        """Assign the cancel topics created since the last look; the number of partitions added."""
        consumer = self._consumer
        assert consumer is not None, "start() first"
        self._discovered = time.monotonic()
        await self.directory.refresh()
        topics = sorted(t for t in self.directory.known if self.pattern.match(t))
        held = {tp.topic for tp in self._live_from}
        fresh_topics = [t for t in topics if t not in held]
        if not fresh_topics:
            return 0
        try:
            fresh = await topic_partitions(self.settings, consumer, fresh_topics)
        except LookupError as e:  # deleted since the listing: the next look sees
            log.info("cancel topics not assigned yet: %s", e)
            return 0
        # Assigning replaces the assignment and forgets positions: keep the current ones.
        kept = {tp: await consumer.position(tp) for tp in self._live_from}
        consumer.assign([*kept, *fresh])
        for tp, offset in kept.items():
            consumer.seek(tp, offset)
        ends = await consumer.end_offsets(fresh)
        since_ms = int((time.time() - self.registry.ttl_s) * 1000)
        starts = await consumer.offsets_for_times({tp: max(0, since_ms) for tp in fresh})
        for tp in fresh:
            found = starts.get(tp)
            consumer.seek(tp, found.offset if found is not None else ends[tp])
            self._live_from[tp] = ends[tp]
        log.info("reading cancels from %d more partitions (%s)", len(fresh), ", ".join(fresh_topics))
        return len(fresh)

    async def poll_once(self) -> int:
        """Fetch and apply what arrived; the number of records read."""
        consumer = self._consumer
        assert consumer is not None
        if not self._live_from:
            await asyncio.sleep(self.poll_timeout_ms / 1000)
            return 0
        batches = await consumer.getmany(timeout_ms=self.poll_timeout_ms)
        # Every valid cancel is in the registry before anything is awaited, so `caught_up` (which
        # compares positions) never sees a position past a cancel not yet held.
        rejected: list[Output] = []
        n = 0
        duty = None
        for tp, records in batches.items():
            for record in records:
                n += 1
                error = self.apply(record)
                if error is None or record.offset < self._live_from.get(tp, 0):
                    continue
                if duty is None:
                    duty = self.on_duty()
                if duty:
                    rejected.append(encode_dead_letter(record, error, stage=self.stage))
        if rejected:
            try:
                await self.dead_letter(rejected)
                self.dead_letters += len(rejected)
            except Exception as e:  # noqa: BLE001 - a lost dead letter must not stop cancelling
                log.error("%d malformed cancels not dead-lettered: %r", len(rejected), e)
        return n

    def apply(self, record: Any) -> DecodeError | None:
        """Hold the cancel `record` carries; why it was refused (its dead letter's error) otherwise."""
        tenant = tenant_of(record.topic, self.prefix)
        try:
            if tenant is None:
                raise DecodeError("wrong_topic", f"{record.topic} is not a tenant's cancel topic")
            event = decode_record(record, CancelRequest, max_bytes=max_event_bytes(record.topic, self.prefix))
            mismatch = tenant_mismatch(record.topic, event.tenant_id, self.prefix)
            if mismatch is not None:
                raise mismatch
        except DecodeError as e:
            log.warning(
                "malformed cancel %s/%d@%d (%s): %s",
                record.topic,
                record.partition,
                record.offset,
                e.error_class,
                limits.cut(e.message, 300),
            )
            return e
        ts = record.timestamp
        published = ts / 1000 if isinstance(ts, int) and ts > 0 else None
        self.registry.add(tenant, event.request_id, event.reason, published_s=published)
        return None

    async def caught_up(self, tenants: Iterable[str], timeout_s: float = 2.0) -> bool:
        """Wait until every cancel of `tenants` published before this call is held (or `timeout_s`
        passed: then False, and the batch goes on; a later cancel still stops the generation)."""
        consumer = self._consumer
        if consumer is None:
            return False
        names = {self.settings.topics.tenant(t).cancel for t in tenants}
        tps = [tp for tp in self._live_from if tp.topic in names]
        if not tps:
            return True
        try:
            ends = await consumer.end_offsets(tps)
            deadline = time.monotonic() + timeout_s
            while True:
                behind = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
                if not behind:
                    return True
                if time.monotonic() >= deadline:
                    log.warning("cancels of %s not read within %.1f s; answering on", behind, timeout_s)
                    return False
                await asyncio.sleep(0.01)
        except KafkaError as e:
            log.warning("could not check the cancels are read: %r", e)
            return False
