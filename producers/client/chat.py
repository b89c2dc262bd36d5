"""The chat client: produce a ChatRequest, await its ChatResponse (and TokenChunks) by request_id.

A client acts as one tenant, `settings.tenant` (`infra.secrets.as_tenant` gives settings acting as
another, with its credentials): it writes to that tenant's request topics, stamps that tenant on
every request, and reads only that tenant's reply topics, so it never sees another tenant's
answers, whatever request ids they carry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from opentelemetry import trace

from infra.kafka.clients import make_producer
from infra.kafka.codec import encode
from infra.settings import Settings
from infra.telemetry import tracer
from producers.cancel import cancel_events, publish_cancels
from producers.client.conversations import Conversations
from producers.client.errors import ChatError, ChatTimeout
from producers.replies import ReplyReader
from producers.requests import build_chat_request
from schemas import ChatMessage, ChatRequest, ChatResponse, Lane, TokenChunk

Reply = ChatResponse | TokenChunk


class ChatClient:
    """One producer and one shared reply consumer per client; safe for many concurrent asks."""

    def __init__(
        self, settings: Settings, *, lanes: Sequence[Lane] = ("chat",), remember: bool = True
    ) -> None:
        self.settings = settings
        self.tenant = settings.tenant
        self.topics = settings.topics.tenant(self.tenant)
        self.lanes = tuple(lanes)
        models: dict[str, type[Reply]] = {self.topics.responses(lane): ChatResponse for lane in self.lanes}
        if "chat" in self.lanes:
            models[self.topics.tokens] = TokenChunk
        self._replies: ReplyReader[Reply] = ReplyReader(settings, models, client_id="ragbus-client")
        self._producer: AIOKafkaProducer | None = None
        self.conversations = Conversations() if remember else None

    async def __aenter__(self) -> ChatClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        await self._replies.start()
        # A question waits for nobody: no linger (batching is for bulk jobs and ingestion).
        self._producer = make_producer(self.settings, client_id="ragbus-client", linger_ms=0)
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
        await self._replies.stop()

    # --- building requests ------------------------------------------------------------------
    def request(
        self,
        question: str,
        *,
        user: str = "anonymous",
        conversation_id: str | None = None,
        history: list[ChatMessage] | None = None,
        timeout: float | None = 60.0,
        max_tokens: int | None = None,
        temperature: float | None = None,
        **fields: Any,
    ) -> ChatRequest:
        """A validated request of this client's tenant (raises pydantic's ValidationError); the
        conversation's earlier turns are its history unless `history` is given. `fields` go to
        `build_chat_request` as they are (lane, stream, model, top_k, system_prompt, client_ip,
        metadata)."""
        if history is None and self.conversations is not None:
            history = self.conversations.history(_conversation(user, conversation_id))
        return build_chat_request(
            question,
            tenant_id=self.tenant,
            user_id=user,
            conversation_id=conversation_id,
            history=history or [],
            timeout=timeout,
            sampling={"max_tokens": max_tokens, "temperature": temperature},
            **fields,
        )

    # --- asking --------------------------------------------------------------------------
    async def send(self, request: ChatRequest) -> None:
        """Publish `request` on this client's tenant's requests topic (the caller registers for its
        reply first, see `ask`). Raises ValueError for a request of another tenant: its answer
        would go to a topic this client does not read (and its principal may not write)."""
        assert self._producer is not None, "use `async with ChatClient(...)`"
        if request.tenant_id != self.tenant:
            raise ValueError(
                f"request {request.request_id} is for tenant {request.tenant_id!r} but this client acts "
                f"as {self.tenant!r}: use a client of that tenant (infra.secrets.as_tenant)"
            )
        if request.lane not in self.lanes:
            raise ValueError(f"this client reads the replies of lanes {self.lanes}, not {request.lane!r}")
        with tracer("ragbus.client").start_as_current_span(
            "ragbus.request",
            kind=trace.SpanKind.PRODUCER,
            attributes={"ragbus.request_id": request.request_id},
        ):
            enc = encode(request)
            await self._producer.send_and_wait(
                self.topics.requests(request.lane), enc.value, key=enc.key, headers=enc.headers
            )

    async def cancel(self, request_ids: Sequence[str], *, reason: str, user_id: str = "anonymous") -> int:
        """Cancel requests of this client's tenant (see `producers.cancel`); the number sent."""
        assert self._producer is not None, "use `async with ChatClient(...)`"
        events = cancel_events(self.tenant, request_ids, reason=reason, user_id=user_id)
        return await publish_cancels(self._producer, self.settings, events)

    async def ask_request(self, request: ChatRequest, *, timeout: float | None = 60.0) -> ChatResponse:
        """Send a prepared request and wait for its final response; raises ChatTimeout / ChatError."""
        queue = self._replies.register(request.request_id)
        try:
            await self.send(request)
            response = await self._final(queue, request.request_id, timeout)
        finally:
            self._replies.unregister(request.request_id)
        if response.error is not None:
            raise ChatError(response)
        if self.conversations is not None:
            self.conversations.record(
                _conversation(request.user_id, request.conversation_id), request.question, response.answer
            )
        return response

    async def ask(self, question: str, *, timeout: float | None = 60.0, **kw: Any) -> ChatResponse:
        """Ask one question and return the answer with its citations, usage and stage timings."""
        return await self.ask_request(self.request(question, timeout=timeout, **kw), timeout=timeout)

    def stream(self, question: str, *, timeout: float | None = 60.0, **kw: Any) -> ChatStream:
        """`async for text in client.stream(...)`: answer tokens as they are generated;
        `.response` holds the final ChatResponse afterwards."""
        request = self.request(question, timeout=timeout, stream=True, **kw)
        return ChatStream(self, request, timeout)

    def stream_request(self, request: ChatRequest, *, timeout: float | None = 60.0) -> ChatStream:
        """Stream the answer to a prepared request (its `stream` flag is set here)."""
        request.stream = True
        return ChatStream(self, request, timeout)

    async def _final(
        self, queue: asyncio.Queue[Reply], request_id: str, timeout: float | None
    ) -> ChatResponse:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ChatTimeout(request_id, timeout or 0)
            try:
                event = await asyncio.wait_for(queue.get(), left)
            except TimeoutError:
                raise ChatTimeout(request_id, timeout or 0) from None
            if isinstance(event, ChatResponse):
                return event

    @property
    def replies(self) -> ReplyReader[Reply]:
        return self._replies


def _conversation(user: str, conversation_id: str | None) -> tuple[str, str] | None:
    """The memory key of a conversation: per user (the client is one tenant's)."""
    return None if conversation_id is None else (user, conversation_id)


class ChatStream:
    def __init__(self, client: ChatClient, request: ChatRequest, timeout: float | None) -> None:
        self.client = client
        self.request = request
        self.timeout = timeout
        self.response: ChatResponse | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        request = self.request
        queue = self.client.replies.register(request.request_id)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        next_index = 0
        try:
            await self.client.send(request)
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise ChatTimeout(request.request_id, self.timeout or 0)
                try:
                    event = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    raise ChatTimeout(request.request_id, self.timeout or 0) from None
                if isinstance(event, TokenChunk):
                    if event.index >= next_index and event.text:  # tokens re-sent after a retry are skipped
                        next_index = event.index + 1
                        yield event.text
                    continue
                self.response = event
                if event.error is not None:
                    raise ChatError(event)
                if next_index == 0 and event.answer:
                    yield event.answer  # served without token events (e.g. from the response cache)
                conv = self.client.conversations
                if conv is not None:
                    key = _conversation(request.user_id, request.conversation_id)
                    conv.record(key, request.question, event.answer)
                return
        finally:
            self.client.replies.unregister(request.request_id)
