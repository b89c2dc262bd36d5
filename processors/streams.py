"""The faust-streaming app that feeds the processors: one agent per input topic, each reading
micro-batches of up to N events whose window opens with the first event (`_next_batch`); without
a window (the default for retrieval, where every millisecond of waiting is latency) a batch is
what has arrived.

Two departures from faust's defaults, both for exactly-once output through our own transactions
(see `infra.kafka.publisher`):

- the consumer reads with isolation_level=read_committed (faust only does so in its own
  exactly-once mode) and never commits offsets itself: the offsets travel in the publisher's
  transactions, and the topics are declared with acks off so faust keeps no ack bookkeeping;
- agents run under `CrashingSupervisor`: an agent that dies takes the app down (and the process
  exits to be restarted from the committed offsets) instead of being restarted in place past
  records whose results were never committed.

faust runs its Kafka consumer on a thread of its own, so group heartbeats continue while the
event loop is busy; the model and Milvus calls run on their own worker threads anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import faust
from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode import CrashingSupervisor

from infra.kafka.clients import client_settings, ssl_context
from infra.settings import Settings
from processors.records import RecordView

log = logging.getLogger(__name__)

BatchHandler = Callable[[Sequence[RecordView]], Awaitable[None]]
RebalanceHandler = Callable[[set[TopicPartition]], Awaitable[None]]


class ReadCommittedConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer, reading only committed records and never committing offsets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # faust reads this flag to choose isolation_level=read_committed and to measure lag
        # against the last stable offset; its commit path below is disabled.
        self.in_transaction = True

    def on_init_dependencies(self) -> list[Any]:
        return []  # no faust TransactionManager: the publisher owns the transactions

    async def commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        return False  # offsets are committed only inside the publisher's transactions


class ReadCommittedTransport(faust_aiokafka.Transport):
    Consumer = ReadCommittedConsumer


#: How long faust's conductor waits after a topic change before it resubscribes (its default, 45 s,
#: coalesces agents starting one by one; our agents start together, and a new tenant should be
#: served within seconds).
RESUBSCRIBE_WAIT_S = 1.0


class ProcessorsApp(faust.App):
    """The processors' faust app. An agent reads one input suffix of every tenant: its "topic"
    (in `build_app`) is the list of those tenants' topics, which `set_agent_topics` changes while
    the app runs."""

    #: agent name → the faust Topic it was declared with (its iterating clones follow it).
    agent_topics: dict[str, Any]

    def _new_transport(self) -> Any:
        return ReadCommittedTransport(self.conf.broker_consumer, self)

    def set_agent_topics(self, name: str, topics: Sequence[str]) -> bool:
        """Make agent `name` read exactly `topics` (e.g. after `ragbus tenants add`); True when that
        changed its topics. faust cannot subscribe by pattern, but a Topic may name several topics
        and the conductor resubscribes (a rebalance) when the names change."""
        root = self.agent_topics[name]
        wanted = sorted(set(topics))
        if not wanted or sorted(root.topics) == wanted:
            return False
        old = set(root.topics)
        for channel in [root, *self._clones_of(root, old)]:
            channel.topics = list(wanted)
        self.topics._flag_changes()  # noqa: SLF001 - faust's only way to ask for a resubscribe
        return True

    def unsubscribed(self, topics: Sequence[str]) -> list[str]:
        """Of `topics`, those the consumer is not subscribed to yet (a change flagged while the
        group was rebalancing is dropped by faust's conductor: flag it again)."""
        index = self.topics._topic_name_index  # noqa: SLF001 - what the consumer subscribed to
        return [t for t in topics if t not in index]

    def resubscribe(self) -> None:
        self.topics._flag_changes()  # noqa: SLF001 - faust's only way to ask for a resubscribe

    def _clones_of(self, root: Any, names: set[str]) -> list[Any]:
        """The conductor's copies of `root` (the agent iterates a clone, not the declared Topic)."""
        return [
            channel
            for channel in list(self.topics)
            if channel is not root
            and (getattr(channel, "_root", None) is root or set(getattr(channel, "topics", ())) == names)
        ]


def _credentials(settings: Settings) -> Any:
    settings = client_settings(settings)  # the local broker's credentials, when it is used
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(ssl_context(settings))
    if settings.kafka_sasl_mechanism == "OAUTHBEARER":
        raise ValueError("the processors do not support SASL OAUTHBEARER; use PLAIN or SCRAM")
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None,
        mechanism=settings.kafka_sasl_mechanism,
        ssl_context=ssl_context(settings) if protocol == "SASL_SSL" else None,
    )


def build_app(
    settings: Settings,
    *,
    group_id: str,
    agents: dict[str, tuple[Sequence[str], int, float, BatchHandler]],
    on_revoked: RebalanceHandler,
    on_assigned: RebalanceHandler,
) -> ProcessorsApp:
    """A faust app in consumer group `group_id` with one agent per entry of `agents`:
    name → (topic, max batch, max wait in seconds (0: none, a batch takes what has arrived),
    handler)."""
    datadir = settings.home / "processors" / "faust"
    datadir.mkdir(parents=True, exist_ok=True)
    app = ProcessorsApp(
        group_id,
        broker=[f"kafka://{host}" for host in settings.bootstrap.split(",")],
        broker_credentials=_credentials(settings),
        broker_client_id=f"ragbus-processors-{settings.process_id}",
        broker_session_timeout=settings.kafka_session_timeout_ms / 1000,
        broker_heartbeat_interval=max(1.0, settings.kafka_session_timeout_ms / 3000),
        broker_max_poll_interval=settings.kafka_max_poll_interval_ms / 1000,
        broker_request_timeout=max(
            settings.kafka_request_timeout_ms / 1000, settings.kafka_session_timeout_ms / 1000
        ),
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        store="memory://",
        datadir=str(datadir),
        stream_buffer_maxsize=2048,
        agent_supervisor=CrashingSupervisor,
    )

    @app.on_partitions_revoked.connect
    async def _revoked(sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        await on_revoked({TopicPartition(tp.topic, tp.partition) for tp in revoked})

    @app.on_partitions_assigned.connect
    async def _assigned(sender: Any, assigned: set[Any], **kwargs: Any) -> None:
        await on_assigned({TopicPartition(tp.topic, tp.partition) for tp in assigned})

    app.topics._resubscribe_sleep_lock_seconds = RESUBSCRIBE_WAIT_S  # noqa: SLF001 - no setting for it
    app.agent_topics = {}
    for name, (topic_names, max_batch, within, handler) in agents.items():
        topic = app.topic(*topic_names, key_serializer="raw", value_serializer="raw", acks=False)
        app.agent_topics[name] = topic
        app.agent(topic, name=name, supervisor_strategy=CrashingSupervisor)(
            _agent(name, max_batch, within, handler)
        )
    return app


def _agent(
    name: str, max_batch: int, within: float, handler: BatchHandler
) -> Callable[[Any], Awaitable[None]]:
    async def agent(stream: Any) -> None:
        def arrived(value: Any) -> Any:
            # faust stamps arrival only for topics with acks on; the batch wait is measured from it
            event = stream.current_event
            if event is not None and not event.message.time_in:
                event.message.time_in = time.monotonic()
            return value

        stream.add_processor(arrived)
        # One batch is pulled ahead while the handler works on the last one: at most max_batch
        # events wait here (a rebalance meanwhile is the publisher's to sort out: it does not
        # commit what a rebalance overtook).
        pulled: asyncio.Queue[Any] = asyncio.Queue(maxsize=max_batch)

        async def pull() -> None:
            async for event in stream.events():
                await pulled.put(event)

        puller = asyncio.ensure_future(pull())
        try:
            while batch := await _next_batch(pulled, puller, stream.channel.queue, max_batch, within):
                await handler([RecordView.from_faust(e.message) for e in batch])
        finally:
            puller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await puller

    agent.__name__ = agent.__qualname__ = name.replace("-", "_")
    return agent


async def _next_batch(
    pulled: asyncio.Queue[Any], puller: asyncio.Future[None], channel: Any, max_batch: int, within: float
) -> list[Any]:
    """The next micro-batch: waits (without a timer) for a first event, then takes what follows
    until `max_batch`, the window `within` (seconds, counted from the first event) ends, or, with
    no window, nothing more is waiting.

    Not faust's `take_events`: its window is a timer that restarts after every batch, so a lone
    request waits for it, and an idle agent wakes up (three tasks per wake-up) every `within`: with
    a few milliseconds' window that is hundreds of wake-ups a second taken from the model's cores.
    Returns [] once the stream has ended.
    """
    first = await _first(pulled, puller)
    if first is _ENDED:
        return []
    batch = [first]
    deadline = time.monotonic() + within
    passes = 0
    while len(batch) < max_batch:
        if not pulled.empty():
            batch.append(pulled.get_nowait())
            continue
        if not channel.empty() and passes < max_batch:  # faust has more on its way: let it through
            passes += 1
            await asyncio.sleep(0)
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(pulled.get(), left))  # a cancelled get loses nothing
        except TimeoutError:
            break
    return batch


_ENDED = object()


async def _first(pulled: asyncio.Queue[Any], puller: asyncio.Future[None]) -> Any:
    """The next event, or `_ENDED` once the stream has stopped; raises what stopped the stream
    (the agent then crashes, as it must)."""
    if not pulled.empty():
        return pulled.get_nowait()
    getting = asyncio.ensure_future(pulled.get())
    try:
        await asyncio.wait([getting, puller], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getting.done():
            getting.cancel()  # a cancelled get loses nothing
    if getting.done() and not getting.cancelled():
        return getting.result()
    puller.result()
    return _ENDED
