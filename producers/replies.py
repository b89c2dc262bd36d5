"""The one reader of reply topics on the producing side: the chat client (and the gateway on it),
bulk jobs and the ingest client all send requests and wait for the events that carry their
request_id back.

No consumer group: a reply belongs to whoever waits for it, and nothing is committed. The reader
assigns every partition of its topics and starts at their end (or at offsets a resumed bulk job
recorded), with the positions resolved before `start()` returns, so nothing sent after it is
missed. Each reply goes to the callback registered for its request_id; replies nobody waits for
(late, or another producer's) are dropped, and a record that does not decode is logged and
skipped — bytes on the bus are untrusted and never stop the reader.

A reader serves one tenant: its topics are that tenant's reply topics (the broker lets the
tenant's principal read those and nothing else), and a reply is delivered only when it was read
from one of them, answers a request id registered here, and names the topic's tenant — so a
response forged onto another tenant's topic, or one claiming another tenant, never reaches a
caller even when it carries a request id the caller sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.kafka.clients import make_consumer, topic_partitions
from infra.kafka.codec import DecodeError, decode_record
from infra.settings import Settings
from schemas import EventBase
from schemas.topics import max_event_bytes, tenant_of

log = logging.getLogger(__name__)

E = TypeVar("E", bound=EventBase)


class ReplyReader(Generic[E]):
    """`models` maps each reply topic to the event type it carries."""

    def __init__(
        self,
        settings: Settings,
        models: Mapping[str, type[E]],
        *,
        client_id: str,
        fetch_max_wait_ms: int = 10,
    ) -> None:
        self.settings = settings
        self.models = dict(models)
        self.client_id = client_id
        self.fetch_max_wait_ms = fetch_max_wait_ms
        #: Where reading started on each partition (known once `start()` returns).
        self.positions: dict[TopicPartition, int] = {}
        self._max_bytes = {t: _max_bytes(settings, t) for t in self.models}
        #: The tenant owning each topic (None for a topic outside the tenant layout).
        self._tenant = {t: tenant_of(t, settings.topic_prefix) for t in self.models}
        # Events without a doc_id are keyed by request_id (infra.kafka.codec.event_key), so a
        # record on those topics whose key nobody waits for is skipped without being parsed.
        self._keyed_by_request = {t: "doc_id" not in m.model_fields for t, m in self.models.items()}
        self._waiters: dict[str, tuple[Callable[[E], Any], bool]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        """Assign every partition and pin where reading starts: the end of each partition, or
        `offsets` (partitions missing from them appeared later, so are read from their start).
        Raises LookupError when a topic does not exist."""
        consumer = make_consumer(
            self.settings, group_id=None, client_id=self.client_id, fetch_max_wait_ms=self.fetch_max_wait_ms
        )
        await consumer.start()
        try:
            tps = await topic_partitions(self.settings, consumer, self.models)
            consumer.assign(tps)
            if offsets is None:
                await consumer.seek_to_end(*tps)
            else:
                for tp in tps:
                    if tp in offsets:
                        consumer.seek(tp, offsets[tp])
                later = [tp for tp in tps if tp not in offsets]
                if later:
                    await consumer.seek_to_beginning(*later)
            self.positions = {tp: await consumer.position(tp) for tp in tps}
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name=f"{self.client_id}-replies")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    def expect(self, request_id: str, deliver: Callable[[E], Any], *, once: bool = False) -> None:
        """Call `deliver` with each reply to `request_id` (only the first when `once`). Register
        before sending the request, or its reply may pass unseen."""
        self._waiters[request_id] = (deliver, once)

    def register(self, request_id: str) -> asyncio.Queue[E]:
        """A queue that receives every reply to `request_id` until `unregister`."""
        queue: asyncio.Queue[E] = asyncio.Queue()
        self.expect(request_id, queue.put_nowait)
        return queue

    def unregister(self, request_id: str) -> None:
        self._waiters.pop(request_id, None)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def raise_if_failed(self) -> None:
        """Re-raise what ended the reader: only a `deliver` callback's own failure can."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: reading replies failed; retrying", self.client_id)
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                for record in records:
                    self._dispatch(record)

    def _dispatch(self, record: Any) -> None:
        topic = record.topic
        if topic not in self.models:
            return  # never assigned here: nothing read elsewhere is a reply to us
        key = record.key
        if (
            self._keyed_by_request[topic]
            and key is not None
            and key.decode("utf-8", "replace") not in self._waiters
        ):
            return  # not ours: skipped without parsing
        try:
            event = decode_record(record, self.models[topic], max_bytes=self._max_bytes[topic])
        except DecodeError as e:
            log.warning("undecodable reply at %s/%d@%d: %s", topic, record.partition, record.offset, e)
            return
        waiter = self._waiters.get(event.request_id)
        if waiter is None:
            return
        owner = self._tenant[topic]
        if owner is not None and event.tenant_id != owner:
            # Only components write reply topics and they answer on the request's tenant's topic;
            # a reply naming another tenant is a forgery or a bug, never an answer to our request.
            log.warning(
                "reply to %s at %s/%d@%d names tenant %r, not the topic's %r: dropped",
                event.request_id,
                topic,
                record.partition,
                record.offset,
                event.tenant_id[:80],
                owner,
            )
            return
        deliver, once = waiter
        if once:
            del self._waiters[event.request_id]
        deliver(event)


def _max_bytes(settings: Settings, topic: str) -> int:
    return max_event_bytes(topic, settings.topic_prefix)
