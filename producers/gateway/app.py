"""The gateway's ASGI app: `ragbus gateway` serves it with uvicorn.

Order of checks on a request: body size (middleware, before anything reads it), API key, then
content type, JSON, the protocol's shape and the contract's limits — each refusal a 4xx in OpenAI's
error shape (producers/gateway/errors.py). Every route lists in OpenAPI the statuses and content
types it answers with (`responses=`), so a client generated from /openapi.json knows them all."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from infra.settings import Settings
from infra.telemetry import setup_telemetry, tracer
from producers.gateway import errors, metrics
from producers.gateway.auth import ApiKeys, Principal
from producers.gateway.batch_routes import FORM_OVERHEAD, add_batch_routes
from producers.gateway.batch_store import BatchStore
from producers.gateway.batches import BatchRunner
from producers.gateway.embeddings import (
    EMBEDDING_ALIAS,
    EmbeddingService,
    ModelUnavailable,
    TextEmbedder,
    check_dimensions,
    parse_request,
    to_response,
)
from producers.gateway.errors import openai_error
from producers.gateway.forwarded import client_address
from producers.gateway.limits import BodySizeLimit
from producers.gateway.quotas import QuotaStore
from producers.gateway.serving import OpenAIServing
from producers.gateway.tenants import TenantClients
from producers.openai.batches import CreateBatchRequest
from producers.openai.convert import InvalidInput, parse_body
from producers.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ErrorBody,
    ModelCard,
    ModelList,
)
from schemas.topics import max_event_bytes

log = logging.getLogger(__name__)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses, all in OpenAI's error shape."""
    words = {
        400: "Invalid request: the body, a parameter ragbus does not support, or a bad header",
        401: "Missing or unknown API key",
        403: "The request is not allowed",
        404: "The model (or file, or batch of this key's tenant) is not here",
        409: "The file is the input of an unfinished batch",
        413: "The body (or the event it makes) is too large",
        415: "The body is not JSON (not multipart/form-data, for a file upload)",
        429: "Over a quota (requests/min, tokens/min, monthly tokens); `Retry-After` says when to retry",
        499: "The request was cancelled",
        500: "Internal error: the message gives the request id to look up in the log",
        503: "The model (or the tenant's bus client, or the quota counters) is not available yet",
        504: "No answer within the deadline",
    }
    return {s: {"model": ErrorBody, "description": words[s]} for s in statuses}


def _json_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The same for a route whose own answers are not JSON (the errors still are)."""
    ref = {"$ref": "#/components/schemas/ErrorBody"}  # registered by the routes that use _errors
    return {
        s: {"description": r["description"], "content": {"application/json": {"schema": ref}}}
        for s, r in _errors(*statuses).items()
    }


def _json_body(model: type[BaseModel], example: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON request body of `model`'s shape. The routes read their
    bodies themselves (so a refusal names the field in OpenAI's words), which leaves FastAPI
    nothing to document; `_with_body_schemas` adds the model to the components."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {"application/json": {"schema": ref, "example": example}}
    return {"requestBody": {"required": True, "content": content}}


def _with_body_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Make app.openapi() include `models` (and the models they use) in its components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


#: One server-sent event of a streamed answer: `data` is a chat.completion.chunk as JSON, an error
#: in OpenAI's shape (after the headers are sent, a failure can only go in the stream), or `[DONE]`.
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}


#: Any request can meet the body cap (400 for a bad Content-Length, 413) and the catch-all 500.
_ALWAYS = (400, 413, 500)


def create_app(
    settings: Settings,
    keys: ApiKeys | None = None,
    served_models: Callable[[], list[str]] | None = None,
    embedder: Callable[[], TextEmbedder] | None = None,
) -> FastAPI:
    """The gateway. `served_models` lists the served model names for `/v1/models` (the CLI passes the
    workers' route table; the gateway itself knows nothing of the workers). `embedder` loads the
    embedding model for `/v1/embeddings` (the CLI passes the processors' loader; it is called on the
    first embeddings request, on a worker thread); without it that route answers 404."""
    keys = keys if keys is not None else ApiKeys.load(settings.gateway_keys_file)
    if not len(keys):
        log.warning("no API keys configured (RAGBUS_GATEWAY_KEYS_FILE): every request will be refused")
    setup_telemetry(settings, "gateway")
    state: dict[str, Any] = {}
    embeddings = EmbeddingService(embedder, settings.embedding_model) if embedder is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One bus client per tenant, started on the tenant's first request, as its principal.
        clients = TenantClients(settings)
        # Quotas: counters in Postgres shared by every gateway (producers/gateway/quotas.py).
        quotas = await QuotaStore.open(settings) if settings.gateway_quotas else None
        state["serving"] = app.state.serving = OpenAIServing(
            clients, timeout=settings.gateway_timeout_s, models=served_models or list, quotas=quotas
        )
        # Batches: rows and leases in Postgres; this gateway runs (and resumes) its tenants' batches.
        batches = await BatchStore.open(settings) if settings.gateway_batches else None
        if batches is not None:
            state["batch_store"] = batches
            state["batch_runner"] = runner = BatchRunner(settings, batches, keys.tenants, quotas)
            await runner.start()
        try:
            yield
        finally:
            if batches is not None:
                await state["batch_runner"].stop()
                await batches.close()
            await state["serving"].close()  # the cancels still going out use the tenants' clients
            await clients.stop()
            if quotas is not None:
                await quotas.close()
            if embeddings is not None:
                embeddings.close()

    app = FastAPI(title="ragbus gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    errors.install(app)
    # Outermost: the cap holds before routing, parsing or the API key check.
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.gateway_max_body_bytes,
        streamed={"/v1/files": settings.gateway_batch_file_max_bytes + FORM_OVERHEAD},
    )
    # Every tenant's chat requests topic has the same spec (any tenant name gives its limit).
    event_limit = max_event_bytes(
        settings.topics.tenant(settings.tenant).requests("chat"), settings.topic_prefix
    )

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

    async def read_json(request: Request) -> Any:
        """The body as decoded JSON, or the 4xx that says why it is not JSON."""
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
            return orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            return invalid(f"the body is not valid JSON: {e}", "invalid_json")

    async def read_body(request: Request) -> ChatCompletionRequest | JSONResponse:
        """The body as a ChatCompletionRequest, or the 4xx that says why it is not one."""
        data = await read_json(request)
        if isinstance(data, Response):
            return data
        if not isinstance(data, dict):
            return invalid("the body must be a JSON object", "invalid_json")
        try:
            return parse_body(data)
        except InvalidInput as e:
            return invalid(str(e), e.code, e.param)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        openapi_extra=_json_body(
            ChatCompletionRequest, {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
        ),
        responses={
            200: {
                "model": ChatCompletion,
                "description": "The answer; with `stream: true`, server-sent chat.completion.chunk events",
                "content": {"text/event-stream": {"schema": _SSE_EVENT}},
            },
            **_errors(*_ALWAYS, 401, 403, 404, 415, 429, 499, 503, 504),
        },
    )
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
                return invalid(str(e), e.code, e.param)
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
            return await serving.create(body, chat_request, who, disconnected=_disconnect_of(request))

    @app.post(
        "/v1/embeddings",
        response_model=None,
        openapi_extra=_json_body(EmbeddingRequest, {"model": EMBEDDING_ALIAS, "input": "hello"}),
        responses={200: {"model": EmbeddingList}, **_errors(*_ALWAYS, 401, 404, 415, 503)},
    )
    async def create_embeddings(request: Request) -> Response:
        """Embeddings with the processors' model, computed in the gateway's process. `model` is the
        model's setting (RAGBUS_EMBEDDING_MODEL) or `ragbus-embed`."""
        if principal(request) is None:
            return unauthorized()
        data = await read_json(request)
        if isinstance(data, Response):
            return data
        try:
            body = parse_request(data)
        except InvalidInput as e:
            return invalid(str(e), e.code, e.param)
        if embeddings is None or body.model not in embeddings.names:
            served = ", ".join(embeddings.names) if embeddings is not None else "none"
            return openai_error(
                404,
                f"`model` is not an embedding model served here (served: {served})",
                "invalid_request_error",
                "model_not_found",
                param="model",
            )
        try:
            embedder = await embeddings.embedder()
            check_dimensions(body, embedder.dimension)
            vectors, tokens = await embeddings.embed(body.input)
        except InvalidInput as e:
            return invalid(str(e), e.code, e.param)
        except ModelUnavailable:
            return openai_error(
                503,
                "the embedding model could not be loaded (the gateway's log says why); try again later",
                "server_error",
                "model_unavailable",
            )
        metrics.EMBEDDINGS.inc(len(body.input))
        return JSONResponse(to_response(body, embeddings.model_name, vectors, tokens).model_dump())

    add_batch_routes(
        app,
        settings,
        state=state,
        principal=principal,
        unauthorized=unauthorized,
        invalid=invalid,
        read_json=read_json,
        errors=_errors,
        json_body=_json_body,
    )

    @app.get("/v1/models", response_model=ModelList, responses=_errors(*_ALWAYS, 401))
    async def models(request: Request) -> Response:
        if principal(request) is None:
            return unauthorized()
        listed = state["serving"].list_models()
        if embeddings is not None:
            listed.data.extend(ModelCard(id=name) for name in embeddings.names)
        return JSONResponse(listed.model_dump())

    @app.get(
        "/healthz",
        responses={
            200: {"description": "Serving: every tenant client started so far reads replies from the bus"},
            503: {"description": "Starting, or a tenant client stopped reading replies"},
            **_errors(*_ALWAYS),
        },
    )
    async def healthz() -> Response:
        serving = state.get("serving")
        ok = serving is not None and serving.clients.alive
        return JSONResponse({"status": "ok" if ok else "starting"}, status_code=200 if ok else 503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            200: {"description": "Prometheus text exposition", "content": {"text/plain": {}}},
            **_json_errors(*_ALWAYS, 401, 404),
        },
    )
    async def prometheus(request: Request) -> Response:
        """Prometheus metrics. RAGBUS_GATEWAY_METRICS says who may read them: `key` (the default)
        any valid API key, `open` anyone, `off` no one (404) — request counts and latencies tell an
        outsider how the service is used, so they are not public unless asked for."""
        if settings.gateway_metrics == "off":
            return openai_error(
                404,
                "/metrics is turned off (RAGBUS_GATEWAY_METRICS=off)",
                "invalid_request_error",
                "not_found",
            )
        if settings.gateway_metrics == "key" and principal(request) is None:
            return unauthorized()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _with_body_schemas(app, ChatCompletionRequest, EmbeddingRequest, CreateBatchRequest)
    _no_422(app)
    return app


def _disconnect_of(request: Request) -> Callable[[], Awaitable[None]]:
    """A wait that returns once the client of `request` has gone away. Its body is read already, so
    the next ASGI message is the disconnect (uvicorn sends it when the connection drops, or once the
    response is complete, by which time nobody waits for it)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return disconnected


def _no_422(app: FastAPI) -> None:
    """Drop FastAPI's automatic 422 from the OpenAPI document: the gateway answers a bad path or
    query parameter with 400 in OpenAI's shape (errors.install), never 422."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
