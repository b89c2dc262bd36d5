"""Hostile HTTP input against the real gateway: its app served by uvicorn on a socket, started
with its lifespan against the session's broker (the gateway's ChatClient needs the topics).

Nothing here needs an answer from the pipeline: every request is refused before it is sent, or
fails sending — which is exactly what must never turn into a 500 with internals in it (for input)
or leak the exception text (for a failure inside)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from infra.kafka.clients import make_admin
from infra.kafka.topics import declare_topics
from infra.settings import Settings
from producers.bulk.formats import field_max_length
from producers.gateway.app import create_app
from producers.gateway.auth import ApiKeys, Principal
from schemas import ChatRequest
from tests.helpers import serve_app

KEY = "sk-hostile-test"
AUTH = {"authorization": f"Bearer {KEY}"}


class Gateway:
    def __init__(self, app: Any, url: str, settings: Settings) -> None:
        self.app, self.url, self.settings = app, url, settings


@pytest.fixture
async def gateway(base_settings: Settings) -> AsyncIterator[Gateway]:
    settings = base_settings.model_copy(update={"gateway_timeout_s": 15.0})
    await declare_topics(settings, tenants=["acme"])
    keys = ApiKeys({hashlib.sha256(KEY.encode()).hexdigest(): Principal("acme", "alice")})
    app = create_app(settings, keys)
    async with serve_app(app) as url:
        yield Gateway(app, url, settings)


def _ask(**fields: object) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "q"}], **fields}).encode()


def _openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


async def test_an_oversize_body_without_a_key_is_413_not_401(gateway: Gateway) -> None:
    cap = gateway.settings.gateway_max_body_bytes
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        r = await http.post("/v1/chat/completions", content=b" " * (cap + 1))
        assert _openai_error(r, 413)["code"] == "request_too_large"

        async def stream() -> AsyncIterator[bytes]:  # chunked: no Content-Length to go by
            for _ in range(cap // 65536 + 2):
                yield b" " * 65536

        r = await http.post("/v1/chat/completions", content=stream())
        assert r.request.headers.get("transfer-encoding") == "chunked"
        _openai_error(r, 413)
        # The gateway still serves afterwards.
        assert (await http.get("/healthz")).status_code == 200


async def test_invalid_json_and_invalid_shapes_are_400_in_openai_shape(gateway: Gateway) -> None:
    too_long = field_max_length(ChatRequest, "question") + 1
    cases: list[tuple[bytes, str | None]] = [
        (b'{"messages": [', None),
        (b"\xff\xfe", None),
        (json.dumps({"messages": [{"role": "robot", "content": 5}]}).encode(), "messages.[0]"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "messages.[0].content"),
        (
            json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}).encode(),
            "messages.[0].content.[0]",
        ),
        # Fits the protocol, refused by the contract (schemas.ChatRequest) when the request is built.
        (json.dumps({"messages": [{"role": "user", "content": "q" * too_long}]}).encode(), "messages"),
        (
            json.dumps({"messages": [{"role": "user", "content": "q"}], "max_tokens": 10**9}).encode(),
            "max_tokens",
        ),
        (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(), "messages"),
    ]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        for body, param in cases:
            r = await http.post(
                "/v1/chat/completions", content=body, headers={**AUTH, "content-type": "application/json"}
            )
            error = _openai_error(r, 400)
            assert error["type"] == "invalid_request_error" and error["param"] == param, (body[:80], error)
            assert "q" * 50 not in error["message"]  # the input is not echoed back
        r = await http.post(
            "/v1/chat/completions", content=b"{}", headers={**AUTH, "content-type": "text/csv"}
        )
        _openai_error(r, 415)


async def test_a_failure_inside_is_a_500_with_only_the_request_id(gateway: Gateway) -> None:
    # Kafka refuses the request: the requests topic now takes no message of this size, so the
    # produce fails inside aiokafka — which the client must see only as a request id.
    admin = make_admin(gateway.settings)
    await admin.start()
    try:
        topic = gateway.settings.topics.tenant("acme").requests("chat")  # the key's tenant's
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs={"max.message.bytes": "64"})
        await admin.alter_configs([resource])
    finally:
        await admin.close()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
        r = await http.post(
            "/v1/chat/completions", content=_ask(), headers={**AUTH, "content-type": "application/json"}
        )
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    request_id = r.headers["x-request-id"]
    assert error["type"] == "internal_error"
    assert error["message"] == f"internal error (request id {request_id})"
    assert "kafka" not in r.text.lower() and "large" not in r.text.lower()


async def test_a_body_under_the_cap_whose_event_is_over_the_topics_limit_is_413(gateway: Gateway) -> None:
    """The body cap bounds what is parsed; the event built from it has an envelope on top, and an
    event larger than the requests topic takes would go to its DLQ instead of being answered."""
    cap = gateway.settings.gateway_max_body_bytes
    n = (cap - 20_000) // 6040  # turns of 6000 characters, leaving ~20 kB for the question
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 6000} for i in range(n)]
    turns.append({"role": "user", "content": ""})
    compact = {"separators": (",", ":")}  # as tight as the event's own JSON
    fill = cap - 8 - len(json.dumps({"messages": turns}, **compact))
    assert 0 < fill < field_max_length(ChatRequest, "question")
    turns[-1]["content"] = "q" * fill
    body = json.dumps({"messages": turns}, **compact).encode()
    assert cap - 16 < len(body) <= cap
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        r = await http.post(
            "/v1/chat/completions", content=body, headers={**AUTH, "content-type": "application/json"}
        )
    error = _openai_error(r, 413)
    assert error["code"] == "request_too_large" and "as an event" in error["message"]
