"""A cap on request bodies, enforced before anything parses them or looks at the API key.

Outermost middleware, so a client — authenticated or not — cannot make the gateway buffer or
parse more than the cap: a declared Content-Length over it is refused without reading a byte, and
a body without one (chunked) is counted as it arrives and refused the moment it passes the cap.
"""

from __future__ import annotations

import json
from typing import Any

from producers.openai.protocol import error_body

Scope = dict[str, Any]
Message = dict[str, Any]


class BodySizeLimit:
    """ASGI middleware: HTTP bodies over `max_bytes` get 413 in OpenAI's error shape.

    Bodies within the cap are read here in full and replayed to the app, which would read them
    whole anyway (JSON cannot be parsed in pieces); the cap bounds that buffer."""

    def __init__(self, app: Any, max_bytes: int, streamed: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        #: Paths whose handler streams the body to disk itself (file uploads), with their own cap:
        #: a declared length over it is refused here; the handler counts a chunked body itself.
        self.streamed = streamed or {}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == -1:
            await _refuse(send, 400, "the Content-Length header is not a number", "invalid_request_error")
            return
        cap = self.streamed.get(scope.get("path", ""))
        if cap is not None:
            if declared is not None and declared > cap:
                await self._too_large(send, cap)
                return
            await self.app(scope, receive, send)
            return
        if declared is not None and declared > self.max_bytes:
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any, cap: int | None = None) -> None:
        await _refuse(
            send,
            413,
            f"the request body is larger than {cap or self.max_bytes} bytes",
            "invalid_request_error",
            "request_too_large",
        )


def _content_length(scope: Scope) -> int | None:
    """The declared body length; None when not declared, -1 when it is not a number."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            if not (text.isascii() and text.isdigit()):
                return -1
            return int(text) if len(text) <= 18 else 10**18  # no 4300-digit int() for a header
    return None


async def _refuse(send: Any, status: int, message: str, type_: str, code: str | None = None) -> None:
    payload = json.dumps(error_body(message, type_, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
