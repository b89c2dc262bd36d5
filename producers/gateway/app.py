"""The gateway's ASGI app: `ragbus gateway` serves it with uvicorn."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infra.settings import Settings
from infra.telemetry import setup_telemetry, tracer
from producers.bulk.formats import BadLine
from producers.client import ChatClient
from producers.gateway import metrics
from producers.gateway.auth import ApiKeys, Principal
from producers.gateway.openai.protocol import ChatCompletionRequest
from producers.gateway.openai.serving import OpenAIServing, openai_error

log = logging.getLogger(__name__)


def _served_models(settings: Settings) -> Callable[[], list[str]]:
    def names() -> list[str]:
        try:
            from inference_workers.config import model_names
        except ImportError:
            return []
        return model_names(settings)

    return names


def create_app(settings: Settings, keys: ApiKeys | None = None) -> FastAPI:
    keys = keys if keys is not None else ApiKeys.load(settings.gateway_keys_file)
    if not len(keys):
        log.warning("no API keys configured (RAGBUS_GATEWAY_KEYS_FILE): every request will be refused")
    setup_telemetry(settings, "gateway")
    state: dict[str, OpenAIServing] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = ChatClient(settings, remember=False)
        await client.start()
        state["serving"] = OpenAIServing(
            client, timeout=settings.gateway_timeout_s, models=_served_models(settings)
        )
        try:
            yield
        finally:
            await client.stop()

    app = FastAPI(title="ragbus gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)

    def principal(request: Request) -> Principal | None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return keys.resolve(token.strip()) if scheme.lower() == "bearer" else None

    def client_ip(request: Request) -> str | None:
        if settings.gateway_trust_forwarded_for and (fwd := request.headers.get("x-forwarded-for")):
            return fwd.split(",")[0].strip()
        return request.client.host if request.client else None

    def unauthorized() -> JSONResponse:
        metrics.REQUESTS.labels("unauthorized", "na").inc()
        return openai_error(401, "missing or unknown API key", "authentication_error", "invalid_api_key")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return openai_error(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        who = principal(request)
        if who is None:
            return unauthorized()
        serving = state["serving"]
        with tracer("ragbus.gateway").start_as_current_span(
            "POST /v1/chat/completions",
            kind=trace.SpanKind.SERVER,
            attributes={"ragbus.tenant_id": who.tenant_id, "http.route": "/v1/chat/completions"},
        ) as span:
            try:
                chat_request = serving.to_request(body, who, client_ip(request))
            except (BadLine, ValueError) as e:
                return openai_error(400, str(e), "invalid_request_error")
            span.set_attribute("ragbus.request_id", chat_request.request_id)
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
