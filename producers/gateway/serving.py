"""Serving side of /v1/chat/completions: OpenAI request → ChatRequest over the bus → OpenAI answer.

Each request goes through the bus client of its API key's tenant (producers/gateway/tenants.py),
so its answer is read from that tenant's reply topics and no other. With quotas on, a request is
admitted against its tenant's and key's limits before it goes on the bus and settled to its real
usage when its answer comes back (producers/gateway/quotas.py).

A client that goes away before its answer (a closed stream, or a dropped connection while a
non-streaming request waits) cancels its request: a cancel event on the tenant's cancel topic, which
the worker honours between decode steps (producers/cancel.py). The request is still answered on the
bus (`cancelled`), so its quota is settled to what it really used."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from producers.cancel import CLIENT_DISCONNECTED, GATEWAY_GAVE_UP
from producers.client import ChatClient, ChatError, ChatTimeout
from producers.gateway import metrics
from producers.gateway.auth import Principal
from producers.gateway.errors import (
    internal_error_body,
    openai_error,
    pipeline_error,
    pipeline_error_response,
    quota_exceeded,
)
from producers.gateway.quotas import QuotaStore, QuotaUnavailable, Reservation, outcome_of
from producers.gateway.tenants import TenantClients, TenantUnavailable
from producers.openai.convert import to_chat_request, to_choices
from producers.openai.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    Usage,
    error_body,
)
from schemas import ChatRequest, ChatResponse

log = logging.getLogger(__name__)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its generator when the response ends, however it ends.

    When the client goes away Starlette stops iterating (a failed send, or a cancelled task) but
    leaves the generator suspended, to be closed whenever it is collected; closing it here runs its
    cleanup at once, and the stream's cleanup is what cancels the request."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()


class OpenAIServing:
    def __init__(
        self,
        clients: TenantClients,
        *,
        timeout: float,
        models: Callable[[], list[str]],
        quotas: QuotaStore | None = None,
    ) -> None:
        self.clients = clients
        self.timeout = timeout
        self.models = models
        self.quotas = quotas
        #: Cancels being published for clients that went away (held so they are not collected).
        self._cancelling: set[asyncio.Task[None]] = set()

    def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in ["ragbus", *self.models()]])

    def to_request(self, body: ChatCompletionRequest, who: Principal, client_ip: str | None) -> ChatRequest:
        """The bus request of an OpenAI request; raises InvalidInput (a 400)."""
        return to_chat_request(
            body, tenant_id=who.tenant_id, user_id=who.user_id, timeout=self.timeout, client_ip=client_ip
        )

    async def _client(self, request: ChatRequest) -> ChatClient | JSONResponse:
        """The bus client of the request's tenant (the API key's), or the 503 saying it is not up."""
        try:
            return await self.clients.get(request.tenant_id)
        except TenantUnavailable:
            metrics.REQUESTS.labels("unavailable", "na").inc()
            return openai_error(
                503,
                "this API key's tenant is not reachable on the bus right now (the gateway's log says "
                "why: its topics or credentials may be missing); try again later",
                "server_error",
                "tenant_unavailable",
                request_id=request.request_id,
            )

    async def _admit(
        self, who: Principal, request: ChatRequest, kind: str
    ) -> Reservation | JSONResponse | None:
        """The request's quota reservation (None with quotas off), or the 429/503 refusing it."""
        if self.quotas is None:
            return None
        try:
            admitted = await self.quotas.reserve(who, request)
        except QuotaUnavailable:
            metrics.REQUESTS.labels("unavailable", kind).inc()
            return openai_error(
                503,
                "the quota counters cannot be reached right now (the gateway's log says why); "
                "try again later",
                "server_error",
                "quota_unavailable",
                request_id=request.request_id,
            )
        if isinstance(admitted, Reservation):
            return admitted
        metrics.REQUESTS.labels("rate_limited", kind).inc()
        return quota_exceeded(admitted, request.request_id)

    async def _settle(self, reservation: Reservation | None, response: ChatResponse | None) -> None:
        """Settle to the answer (None: no answer, an error for the count)."""
        if self.quotas is not None and reservation is not None:
            outcome = outcome_of(response) if response is not None else "error"
            await self.quotas.settle(reservation, outcome, response)

    def cancel_soon(
        self,
        client: ChatClient,
        request: ChatRequest,
        unsettled: Reservation | None = None,
        reason: str = CLIENT_DISCONNECTED,
    ) -> None:
        """Publish the cancel of `request` in the background (the caller may itself be cancelled: a
        stream whose client went away), then settle `unsettled` as a request without an answer."""

        async def send() -> None:
            try:
                await client.cancel([request.request_id], reason=reason, user_id=request.user_id)
                metrics.CANCELS.labels(reason).inc()
                log.info("request %s: cancel sent (%s)", request.request_id, reason)
            except Exception as e:  # noqa: BLE001 - the answer still comes, it just is not stopped early
                log.warning("request %s: cancel not sent: %s: %s", request.request_id, type(e).__name__, e)
            await self._settle(unsettled, None)

        task = asyncio.create_task(send(), name=f"cancel-{request.request_id}")
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    async def close(self) -> None:
        """Wait (briefly) for the cancels still being sent."""
        if self._cancelling:
            await asyncio.wait(set(self._cancelling), timeout=5)

    async def _ask(
        self, client: ChatClient, request: ChatRequest, disconnected: Callable[[], Awaitable[None]] | None
    ) -> ChatResponse:
        """`client.ask_request`, cancelling the request when `disconnected()` returns first (the
        client went away); the answer (then a `cancelled` error) is still awaited, for the quota."""
        asking = asyncio.ensure_future(client.ask_request(request, timeout=self.timeout))
        if disconnected is None:
            return await asking
        gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({asking, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not asking.done() and gone.done() and not gone.cancelled() and gone.exception() is None:
                self.cancel_soon(client, request)
            return await asking
        finally:
            for task in (asking, gone):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await gone

    async def create(
        self,
        body: ChatCompletionRequest,
        request: ChatRequest,
        who: Principal,
        disconnected: Callable[[], Awaitable[None]] | None = None,
    ) -> Any:
        """Answer `request`; `disconnected` (for a non-streaming request) returns once the client
        has gone away, which cancels the request."""
        started = time.monotonic()
        kind = "true" if body.stream else "false"
        client = await self._client(request)
        if isinstance(client, JSONResponse):
            return client
        reservation = await self._admit(who, request, kind)
        if isinstance(reservation, JSONResponse):
            return reservation
        if body.stream:
            return ClosingStreamingResponse(
                self._sse(client, body, request, started, reservation),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": request.request_id},
            )
        metrics.INFLIGHT.inc()
        try:
            response = await self._ask(client, request, disconnected)
        except ChatTimeout as e:
            metrics.REQUESTS.labels("timeout", kind).inc()
            await self._settle(reservation, None)
            return openai_error(504, str(e), "timeout", "timeout", request_id=request.request_id)
        except ChatError as e:
            await self._settle(reservation, e.response)
            return self._failed(e.response, kind)
        finally:
            metrics.INFLIGHT.dec()
        # Settled before the answer goes out, so the next request (through any gateway) sees it.
        await self._settle(reservation, response)
        metrics.REQUESTS.labels("ok", kind).inc()
        metrics.LATENCY.labels(kind).observe(time.monotonic() - started)
        self._count_tokens(response)
        return JSONResponse(
            self._completion(response).model_dump(), headers={"X-Request-Id": request.request_id}
        )

    def _failed(self, response: ChatResponse, kind: str) -> JSONResponse:
        assert response.error is not None
        metrics.REQUESTS.labels(response.error.code.value, kind).inc()
        return pipeline_error_response(response)

    @staticmethod
    def _count_tokens(response: ChatResponse) -> None:
        metrics.TOKENS.labels("prompt").inc(response.usage.prompt_tokens)
        metrics.TOKENS.labels("completion").inc(response.usage.completion_tokens)

    @staticmethod
    def _usage(response: ChatResponse) -> Usage:
        u = response.usage
        return Usage(
            prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens
        )

    def _completion(self, response: ChatResponse) -> ChatCompletion:
        return ChatCompletion(
            id=f"chatcmpl-{response.request_id}",
            created=int(response.created_at.timestamp()),
            model=response.model or "ragbus",
            choices=to_choices(response),
            usage=self._usage(response),
            citations=[c.model_dump(mode="json") for c in response.citations],
            ragbus={
                "request_id": response.request_id,
                "cached": response.cached,
                "timings": response.timings.model_dump(exclude_none=True),
            },
        )

    async def _sse(
        self,
        client: ChatClient,
        body: ChatCompletionRequest,
        request: ChatRequest,
        started: float,
        reservation: Reservation | None,
    ) -> AsyncIterator[str]:
        cid, created = f"chatcmpl-{request.request_id}", int(time.time())
        model = body.model or "ragbus"

        def chunk(delta: Delta, finish: str | None = None, usage: Usage | None = None) -> str:
            choices = [] if usage is not None else [ChunkChoice(delta=delta, finish_reason=finish)]
            c = ChatCompletionChunk(id=cid, created=created, model=model, choices=choices, usage=usage)
            return f"data: {c.model_dump_json(exclude_none=usage is None)}\n\n"

        metrics.INFLIGHT.inc()
        stream = client.stream_request(request, timeout=self.timeout)
        answered = settled = False
        try:
            yield chunk(Delta(role="assistant", content=""))
            async for text in stream:
                yield chunk(Delta(content=text))
            final = stream.response
            assert final is not None
            answered = settled = True
            await self._settle(reservation, final)
            model = final.model or model
            yield chunk(Delta(), finish=final.finish_reason or "stop")
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk(Delta(), usage=self._usage(final))
            metrics.REQUESTS.labels("ok", "true").inc()
            metrics.LATENCY.labels("true").observe(time.monotonic() - started)
            self._count_tokens(final)
        except ChatTimeout as e:
            metrics.REQUESTS.labels("timeout", "true").inc()
            settled = True
            await self._settle(reservation, None)
            yield f"data: {json.dumps(error_body(str(e), 'timeout', 'timeout'))}\n\n"
        except ChatError as e:
            answered = settled = True
            metrics.REQUESTS.labels(e.code.value, "true").inc()
            await self._settle(reservation, e.response)
            yield f"data: {json.dumps(pipeline_error(e.response)[1])}\n\n"
        except Exception as e:  # noqa: BLE001 - the headers are sent: the error can only go in the stream
            metrics.REQUESTS.labels("internal_error", "true").inc()
            settled = True
            await self._settle(reservation, None)
            log.error("request %s: stream failed: %s: %s", request.request_id, type(e).__name__, e)
            yield f"data: {json.dumps(internal_error_body(request.request_id))}\n\n"
        finally:
            metrics.INFLIGHT.dec()
            if not answered:
                # The client went away (this generator was cancelled or closed mid-stream), or the
                # stream failed or timed out: nobody reads the rest, so the worker stops it.
                if settled:
                    self.cancel_soon(client, request, reason=GATEWAY_GAVE_UP)
                else:
                    self.cancel_soon(client, request, reservation)
        yield "data: [DONE]\n\n"
