"""How the gateway says no: always OpenAI's error shape (`{"error": {message, type, param, code}}`),
a 4xx for anything the client sent, and never the text of an internal exception.

Pipeline failures (a ChatResponse with `error`) reach the client as a status, a code, a generic
message and the request id; the full text is logged here and is in the audit row of the response,
so an operator finds it by the id the client reports.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from producers.gateway.quota_windows import Exceeded
from producers.openai.convert import common_param, loc_path
from producers.openai.protocol import error_body
from schemas import ChatResponse, ErrorCode, new_id

log = logging.getLogger(__name__)


def openai_error(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    *,
    param: str | None = None,
    request_id: str | None = None,
) -> JSONResponse:
    headers = {"X-Request-Id": request_id} if request_id else None
    return JSONResponse(error_body(message, type_, code, param), status_code=status, headers=headers)


def quota_exceeded(over: Exceeded, request_id: str) -> JSONResponse:
    """429 in OpenAI's shape: `rate_limit_exceeded` (type `requests` or `tokens`) for a per-minute
    limit, `insufficient_quota` for the monthly budget. `Retry-After` says when the window that is
    full ends; a request larger than the whole limit gets none and `x-should-retry: false` (the
    official clients then do not retry), since waiting cannot help it."""
    if over.kind == "monthly_tokens":
        type_, code = "insufficient_quota", "insufficient_quota"
    else:
        type_, code = over.kind, "rate_limit_exceeded"
    response = openai_error(429, over.message, type_, code, request_id=request_id)
    if over.retry_after_s is None:
        response.headers["x-should-retry"] = "false"
    else:
        response.headers["Retry-After"] = str(over.retry_after_s)
    return response


def invalid_request(err: RequestValidationError) -> JSONResponse:
    """400 for what FastAPI's own validation refuses, naming the field (never echoing the input)."""
    errors = list(err.errors())
    message = "; ".join(
        f"{loc_path([x for x in e.get('loc', ()) if x != 'body']) or 'body'}: {e.get('msg')}"
        for e in errors[:3]
    )
    param = common_param([e.get("loc", ()) for e in errors])
    return openai_error(400, message or "invalid request", "invalid_request_error", param=param)


#: Pipeline error code → (HTTP status, OpenAI error type, OpenAI error code, generic message).
_PIPELINE: dict[ErrorCode, tuple[int, str, str, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error", "invalid_request", "the request was refused"),
    ErrorCode.CONTEXT_OVERFLOW: (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "the messages do not fit in the model's context window",
    ),
    ErrorCode.UNKNOWN_MODEL: (
        404,
        "invalid_request_error",
        "model_not_found",
        "the model is not served here; GET /v1/models lists the models",
    ),
    ErrorCode.UNAUTHORIZED: (403, "permission_error", "unauthorized", "the request is not allowed"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "timeout", "timeout", "no answer within the deadline"),
    ErrorCode.CANCELLED: (499, "cancelled", "cancelled", "the request was cancelled"),
    ErrorCode.RETRIEVAL_ERROR: (500, "server_error", "retrieval_error", "retrieving context failed"),
    ErrorCode.ENGINE_ERROR: (500, "server_error", "engine_error", "the model engine failed"),
    ErrorCode.INGEST_ERROR: (500, "server_error", "ingest_error", "ingestion failed"),
    ErrorCode.INTERNAL_ERROR: (500, "server_error", "internal_error", "internal error"),
}


def pipeline_error(response: ChatResponse) -> tuple[int, dict[str, Any]]:
    """(status, OpenAI error body) for a response that carries an error; logs the full text."""
    assert response.error is not None
    code = response.error.code
    status, type_, openai_code, generic = _PIPELINE.get(code, _PIPELINE[ErrorCode.INTERNAL_ERROR])
    log.warning("request %s answered %s: %s", response.request_id, code.value, response.error.message)
    return status, error_body(f"{generic} (request id {response.request_id})", type_, openai_code)


def pipeline_error_response(response: ChatResponse) -> JSONResponse:
    status, body = pipeline_error(response)
    return JSONResponse(body, status_code=status, headers={"X-Request-Id": response.request_id})


def internal_error_body(request_id: str) -> dict[str, Any]:
    return error_body(f"internal error (request id {request_id})", "internal_error")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path. Starlette's 405 names only the first
    route that matched the path, but a path may have one route per method (GET and POST
    /v1/batches), and `Allow` must list them all (RFC 9110)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Exception handlers: FastAPI's 422 and Starlette's HTTP errors in OpenAI's shape, and a
    catch-all 500 that says only which request id to look up in the log."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_request(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        response = openai_error(exc.status_code, str(exc.detail), type_, code)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(allowed_methods(request))
        return response

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None) or new_id()
        # One line that ties the id to the exception; the server logs the traceback after it.
        log.error(
            "request %s: %s %s failed: %s: %s",
            request_id,
            request.method,
            request.url.path,
            type(exc).__name__,
            exc,
        )
        return JSONResponse(internal_error_body(request_id), 500, headers={"X-Request-Id": request_id})
