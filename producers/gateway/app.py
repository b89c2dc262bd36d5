"""The gateway's ASGI app: `ragbus gateway` serves it with uvicorn.

Order of checks on a request: body size (middleware, before anything reads it), API key, then
content type, JSON, the protocol's shape and the contract's limits — each refusal a 4xx in OpenAI's
error shape (producers/gateway/errors.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infra.settings import Settings
from infra.telemetry import setup_telemetry, tracer
from producers.client import ChatClient
from producers.gateway import errors, metrics
from producers.gateway.auth import ApiKeys, Principal
from producers.gateway.errors import openai_error
from producers.gateway.forwarded import client_address
from producers.gateway.limits import BodySizeLimit
from producers.gateway.serving import OpenAIServing
from producers.openai.convert import InvalidInput, parse_body
from producers.openai.protocol import ChatCompletionRequest
from schemas.topics import max_event_bytes

log = logging.getLogger(__name__)


def create_app(
    settings: Settings, keys: ApiKeys | None = None, served_models: Callable[[], list[str]] | None = None
) -> FastAPI:
    """The gateway. `served_models` lists the served model names for `/v1/models` (the CLI passes the
    workers' route table; the gateway itself knows nothing of the workers)."""
    keys = keys if keys is not None else ApiKeys.load(settings.gateway_keys_file)
    if not len(keys):
        log.warning("no API keys configured (RAGBUS_GATEWAY_KEYS_FILE): every request will be refused")
    setup_telemetry(settings, "gateway")
    state: dict[str, OpenAIServing] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = ChatClient(settings, remember=False)
        await client.start()
        state["serving"] = app.state.serving = OpenAIServing(
            client, timeout=settings.gateway_timeout_s, models=served_models or list
        )
        try:
            yield
        finally:
            await client.stop()

    app = FastAPI(title="ragbus gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    errors.install(app)
    # Outermost: the cap holds before routing, parsing or the API key check.
    app.add_middleware(BodySizeLimit, max_bytes=settings.gateway_max_body_bytes)
    event_limit = max_event_bytes(settings.topics.requests("chat"), settings.topic_prefix)

    def principal(request: Request) -> Principal | None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return keys.resolve(token.strip()) if scheme.lower() == "bearer" else None

    def client_ip(request: Request) -> str | None:
        return client_address(
            request.client.host if request.client else None,
            request.headers.getlist("x-forwarded-for"),
            trust_forwarded_for=settings.gateway_trust_forwarded_for,
            trusted_proxies=settings.gateway_trusted_proxies,
        )

    def unauthorized() -> JSONResponse:
        metrics.REQUESTS.labels("unauthorized", "na").inc()
        return openai_error(401, "missing or unknown API key", "authentication_error", "invalid_api_key")

    def invalid(message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
        metrics.REQUESTS.labels("invalid", "na").inc()
        return openai_error(400, message, "invalid_request_error", code, param=param)

    async def read_body(request: Request) -> ChatCompletionRequest | JSONResponse:
        """The body as a ChatCompletionRequest, or the 4xx that says why it is not one."""
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media and media != "application/json" and not media.endswith("+json"):
            metrics.REQUESTS.labels("invalid", "na").inc()
            return openai_error(
                415,
                "send the body as JSON, with Content-Type: application/json",
                "invalid_request_error",
                "unsupported_media_type",
            )
        try:
            data = orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            return invalid(f"the body is not valid JSON: {e}", "invalid_json")
        if not isinstance(data, dict):
            return invalid("the body must be a JSON object", "invalid_json")
        try:
            return parse_body(data)
        except InvalidInput as e:
            return invalid(str(e), param=e.param)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        who = principal(request)
        if who is None:
            return unauthorized()
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        serving = state["serving"]
        with tracer("ragbus.gateway").start_as_current_span(
            "POST /v1/chat/completions",
            kind=trace.SpanKind.SERVER,
            attributes={"ragbus.tenant_id": who.tenant_id, "http.route": "/v1/chat/completions"},
        ) as span:
            try:
                chat_request = serving.to_request(body, who, client_ip(request))
            except InvalidInput as e:
                return invalid(str(e), param=e.param)
            request.state.request_id = chat_request.request_id
            span.set_attribute("ragbus.request_id", chat_request.request_id)
            size = len(chat_request.model_dump_json().encode())
            if size > event_limit:
                metrics.REQUESTS.labels("invalid", "na").inc()
                return openai_error(
                    413,
                    f"the request is {size} bytes as an event; the chat lane takes at most "
                    f"{event_limit} (shorten the messages)",
                    "invalid_request_error",
                    "request_too_large",
                )
            return await serving.create(body, chat_request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if principal(request) is None:
            return unauthorized()
        return JSONResponse(state["serving"].list_models().model_dump())

    @app.get("/healthz")
    async def healthz() -> Response:
        serving = state.get("serving")
        ok = serving is not None and serving.client.replies.alive
        return JSONResponse({"status": "ok" if ok else "starting"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
