"""The gateway's Files and Batch API routes: `/v1/files` and `/v1/batches`, in OpenAI's shapes.

Everything is the API key's tenant's: a file or batch of another tenant is answered 404 exactly
as an id that does not exist (a key learns nothing of other tenants). Uploads are streamed to a
spool file under the home as they arrive, counted against `gateway_batch_file_max_bytes`, and
parsed from disk (producers/gateway/multipart.py). Batches run in the background
(producers/gateway/batches.py); these routes only create, read, list and cancel rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import unicodedata
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError

from infra.settings import Settings
from producers.gateway.auth import Principal
from producers.gateway.batch_store import BatchStore
from producers.gateway.batches import BatchRunner, file_path, files_dir, new_batch_id, new_file_id
from producers.gateway.errors import openai_error
from producers.gateway.multipart import MultipartError, boundary_of, copy_range, parse_file, read_range
from producers.openai.batches import (
    Batch,
    BatchList,
    CreateBatchRequest,
    FileDeleted,
    FileList,
    FileObject,
    list_page,
)
from producers.openai.convert import InvalidInput
from schemas import limits

#: Multipart overhead a file upload may carry beyond the file's own cap (boundaries, headers, purpose).
FORM_OVERHEAD = 64 * 1024
#: OpenAI's page sizes.
PAGE_DEFAULT, PAGE_MAX = 20, 100


def _clean_filename(name: str | None) -> str:
    text = "".join(c for c in (name or "upload.jsonl") if unicodedata.category(c)[0] != "C")
    text = text.replace("/", "_").replace("\\", "_").strip() or "upload.jsonl"
    return limits.cut(text, limits.FILENAME_MAX)


def _not_found(what: str, ident: str) -> JSONResponse:
    return openai_error(
        404, f"no {what} {ident[:80]!r} (of this key's tenant)", "invalid_request_error", "not_found"
    )


def add_batch_routes(
    app: FastAPI,
    settings: Settings,
    *,
    state: dict[str, Any],
    principal: Callable[[Request], Principal | None],
    unauthorized: Callable[[], JSONResponse],
    invalid: Callable[..., JSONResponse],
    read_json: Callable[[Request], Any],
    errors: Callable[..., dict[int | str, dict[str, Any]]],
    json_body: Callable[[type[Any], dict[str, Any]], dict[str, Any]],
) -> None:
    """Add the routes to `app`; `state["batch_store"]` and `state["batch_runner"]` are set by the
    app's lifespan when `gateway_batches` is on."""
    cap = settings.gateway_batch_file_max_bytes
    always = (400, 413, 500)

    def off() -> JSONResponse | None:
        if state.get("batch_store") is None:
            return openai_error(
                404,
                "the Files and Batch API is off on this gateway; set RAGBUS_GATEWAY_BATCHES=true (it needs "
                "the database migrated by `ragbus up`)",
                "invalid_request_error",
                "not_found",
            )
        return None

    def admit(request: Request) -> Principal | JSONResponse:
        """The key's principal, or the answer that refuses the request: 401 without a valid key,
        404 while the API is off on this gateway."""
        who = principal(request)
        if who is None:
            return unauthorized()
        return off() or who

    def store() -> BatchStore:
        return state["batch_store"]  # type: ignore[no-any-return]

    async def spool(request: Request, dest: Path) -> int | None:
        """Write the body to `dest`; its size, or None once it passes the cap (the rest unread)."""
        size = 0
        with dest.open("wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap + FORM_OVERHEAD:
                    return None
                f.write(chunk)
        return size

    @app.post(
        "/v1/files",
        response_model=FileObject,
        responses=errors(*always, 401, 404, 415),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file", "purpose"],
                            "properties": {
                                "file": {"type": "string", "format": "binary"},
                                "purpose": {"type": "string", "enum": ["batch"]},
                            },
                        }
                    }
                },
            }
        },
    )
    async def upload_file(request: Request) -> Response:
        """Upload a JSONL file of batch requests (purpose `batch`), up to the gateway's file limit."""
        who = admit(request)
        if isinstance(who, JSONResponse):
            return who
        try:
            boundary = boundary_of(request.headers.get("content-type", ""))
        except MultipartError as e:
            return openai_error(415, str(e), "invalid_request_error", "unsupported_media_type")
        incoming = settings.home / "files" / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        spooled = incoming / uuid.uuid4().hex
        try:
            size = await spool(request, spooled)
            if size is None:
                return openai_error(
                    413,
                    f"the file is larger than this gateway takes ({cap} bytes); split it",
                    "invalid_request_error",
                    "file_too_large",
                )
            try:
                parts = {p.name: p for p in await asyncio.to_thread(parse_file, spooled, boundary)}
            except MultipartError as e:
                return invalid(str(e), "invalid_multipart")
            purpose_part, file_part = parts.get("purpose"), parts.get("file")
            if purpose_part is None or file_part is None:
                missing = "purpose" if purpose_part is None else "file"
                return invalid(f"the form has no `{missing}` field", "missing_required_parameter", missing)
            purpose = read_range(spooled, purpose_part.start, purpose_part.end, 64).decode("utf-8", "replace")
            if purpose.strip() != "batch":
                return invalid(
                    f"purpose {purpose[:32]!r} is not served here: only `batch`", "invalid_value", "purpose"
                )
            nbytes = file_part.end - file_part.start
            if nbytes > cap:
                return openai_error(
                    413,
                    f"the file is {nbytes} bytes; this gateway takes at most {cap}",
                    "invalid_request_error",
                    "file_too_large",
                )
            if nbytes == 0:
                return invalid("the file is empty", "invalid_value", "file")
            file_id = new_file_id()
            files_dir(settings.home, who.tenant_id).mkdir(parents=True, exist_ok=True)
            dest = file_path(settings.home, who.tenant_id, file_id)
            await asyncio.to_thread(copy_range, spooled, file_part.start, file_part.end, dest)
            obj = await store().add_file(
                file_id, who.tenant_id, "batch", _clean_filename(file_part.filename), nbytes
            )
        finally:
            with contextlib.suppress(OSError):
                spooled.unlink()
        return JSONResponse(obj.model_dump())

    @app.get("/v1/files", response_model=FileList, responses=errors(*always, 401, 404))
    async def list_files(
        request: Request,
        purpose: str | None = Query(None, max_length=32),
        after: str | None = Query(None, max_length=limits.EVENT_ID_MAX),
        limit: int = Query(PAGE_DEFAULT, ge=1, le=10_000),
    ) -> Response:
        who = admit(request)
        if isinstance(who, JSONResponse):
            return who
        limit = min(limit, 10_000)
        rows = await store().list_files(who.tenant_id, purpose=purpose, after=after, limit=limit + 1)
        return JSONResponse(list_page(FileList, rows, limit).model_dump())

    @app.get("/v1/files/{file_id}", response_model=FileObject, responses=errors(*always, 401, 404))
    async def get_file(request: Request, file_id: str) -> Response:
        who = admit(request)
        if isinstance(who, JSONResponse):
            return who
        obj = await store().get_file(who.tenant_id, file_id)
        return _not_found("file", file_id) if obj is None else JSONResponse(obj.model_dump())

    @app.get(
        "/v1/files/{file_id}/content",
        response_class=Response,
        responses={
            200: {"description": "The file's bytes (JSONL)", "content": {"application/jsonl": {}}},
            **errors(*always, 401, 404),
        },
    )
    async def file_content(request: Request, file_id: str) -> Response:
        who = admit(request)
        if isinstance(who, JSONResponse):
            return who
        obj = await store().get_file(who.tenant_id, file_id)
        path = file_path(settings.home, who.tenant_id, file_id) if obj is not None else None
        if path is None or not path.exists():
            return _not_found("file", file_id)
        return FileResponse(path, media_type="application/jsonl", filename=obj.filename if obj else None)

    @app.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=errors(*always, 401, 404, 409))
    async def delete_file(request: Request, file_id: str) -> Response:
        who = admit(request)
        if isinstance(who, JSONResponse):
            return who
        if await store().get_file(who.tenant_id, file_id) is None:
            return _not_found("file", file_id)
        if await store().file_in_use(who.tenant_id, file_id):
            return openai_error(
                409,
                f"file {file_id} is the input of an unfinished batch; cancel the batch "
                "(or let it finish) first",
                "invalid_request_error",
                "file_in_use",
            )
        await store().delete_file(who.tenant_id, file_id)
        with contextlib.suppress(OSError):
            file_path(settings.home, who.tenant_id, file_id).unlink()
        return JSONResponse(FileDeleted(id=file_id).model_dump())

    @app.post(
        "/v1/batches",
        response_model=Batch,
        responses=errors(*always, 401, 404, 415),
        openapi_extra=json_body(
            CreateBatchRequest,
            {"input_file_id": "file-abc123", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        ),
    )
    async def create_batch(request: Request) -> Response:
        """Run the requests of an uploaded file (purpose `batch`) on the bulk lane."""
        who = admit(request)
        if isinstance(who, JSONResponse):
            return who
        data = await read_json(request)
        if isinstance(data, Response):
            return data
        try:
            body = CreateBatchRequest.model_validate(data)
        except ValidationError as e:
            bad = InvalidInput.of_protocol(e)
            return invalid(str(bad), bad.code or "invalid_value", bad.param)
        source = await store().get_file(who.tenant_id, body.input_file_id)
        if source is None:
            return _not_found("file", body.input_file_id)
        if source.purpose != "batch":
            return invalid(
                f"file {source.id} has purpose {source.purpose}; upload the requests with purpose `batch`",
                "invalid_value",
                "input_file_id",
            )
        batch = await store().add_batch(
            new_batch_id(),
            who.tenant_id,
            who.user_id,
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            metadata=body.metadata,
            expires_in=timedelta(seconds=settings.gateway_batch_expiry_s),
        )
        runner: BatchRunner = state["batch_runner"]
        runner.kick(batch.id)
        return JSONResponse(batch.model_dump())

    @app.get("/v1/batches", response_model=BatchList, responses=errors(*always, 401, 404))
    async def list_batches(
        request: Request,
        after: str | None = Query(None, max_length=limits.EVENT_ID_MAX),
        limit: int = Query(PAGE_DEFAULT, ge=1, le=PAGE_MAX),
    ) -> Response:
        """The tenant's batches, newest first; `after` (a batch id) gives the page after it."""
        who = admit(request)
        if isinstance(who, JSONResponse):
            return who
        rows = await store().list_batches(who.tenant_id, after=after, limit=limit + 1)
        return JSONResponse(list_page(BatchList, rows, limit).model_dump())

    @app.get("/v1/batches/{batch_id}", response_model=Batch, responses=errors(*always, 401, 404))
    async def get_batch(request: Request, batch_id: str) -> Response:
        who = admit(request)
        if isinstance(who, JSONResponse):
            return who
        batch = await store().get_batch(who.tenant_id, batch_id)
        return _not_found("batch", batch_id) if batch is None else JSONResponse(batch.model_dump())

    @app.post("/v1/batches/{batch_id}/cancel", response_model=Batch, responses=errors(*always, 401, 404))
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        """Stop sending the batch's remaining requests: `cancelling`, then `cancelled` with the
        answers so far in its output file. A finished batch is answered as it is."""
        who = admit(request)
        if isinstance(who, JSONResponse):
            return who
        batch = await store().request_cancel(who.tenant_id, batch_id)
        return _not_found("batch", batch_id) if batch is None else JSONResponse(batch.model_dump())
