"""Cancelling requests: one CancelRequest per request id on the tenant's `chat.cancel` topic.

The gateway calls this when a client goes away, the Batch API when a batch is cancelled. The
worker that holds (or will hold) each request stops it between decode steps, or skips it when it
arrives, and answers it with a `cancelled` error on the responses topic, so the request is still
answered once and audited. A cancel is best-effort about timing, not about the answer: a request
that finished before its cancel was read keeps its answer.

Settings act as the tenant whose requests are cancelled (`infra.secrets.as_tenant`): its
principal may write only its own cancel topic, and the worker cancels only that tenant's requests.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import AIOKafkaProducer

from infra.kafka.clients import make_producer
from infra.kafka.codec import encode
from infra.settings import Settings
from schemas import CancelRequest, Lane

#: The reasons ragbus itself gives (any short text is valid).
CLIENT_DISCONNECTED = "client_disconnected"
BATCH_CANCELLED = "batch_cancelled"
#: A batch ran past its completion window: its lines in flight stop.
BATCH_EXPIRED = "batch_expired"
#: The gateway stopped waiting (its timeout, or the stream failed): nobody reads the answer.
GATEWAY_GAVE_UP = "gateway_gave_up"


def cancel_events(
    tenant: str, request_ids: Iterable[str], *, reason: str, user_id: str = "anonymous", lane: Lane = "chat"
) -> list[CancelRequest]:
    """The validated cancel events (raises pydantic's ValidationError for an id or reason the contract
    refuses, before anything is sent). Repeated ids are sent once."""
    return [
        CancelRequest(request_id=rid, tenant_id=tenant, user_id=user_id, lane=lane, reason=reason)
        for rid in dict.fromkeys(request_ids)
    ]


async def publish_cancels(
    producer: AIOKafkaProducer, settings: Settings, events: Iterable[CancelRequest]
) -> int:
    """Send `events` on their tenant's cancel topic with a started `producer` and wait until the
    broker has them all; the number sent."""
    sent = []
    for ev in events:
        enc = encode(ev)
        topic = settings.topics.tenant(ev.tenant_id).cancel
        sent.append(await producer.send(topic, enc.value, key=enc.key, headers=enc.headers))
    for delivered in sent:
        await delivered
    return len(sent)


async def cancel(
    settings: Settings,
    request_ids: Iterable[str],
    *,
    reason: str = BATCH_CANCELLED,
    producer: AIOKafkaProducer | None = None,
) -> int:
    """Cancel `request_ids` of the tenant `settings` act as; the number of cancels sent. Pass a
    started `producer` (with that tenant's credentials) to reuse it; else one is opened for the call."""
    events = cancel_events(settings.tenant, request_ids, reason=reason)
    if not events:
        return 0
    if producer is not None:
        return await publish_cancels(producer, settings, events)
    own = make_producer(settings, client_id="ragbus-cancel")
    await own.start()
    try:
        return await publish_cancels(own, settings, events)
    finally:
        await own.stop()
