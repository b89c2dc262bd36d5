"""The gateway's body cap and input errors, on its real app object without a broker: everything
here is refused before the app would touch Kafka (no lifespan runs)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from infra.settings import Settings
from producers.gateway.app import create_app
from producers.gateway.auth import ApiKeys, Principal
from producers.gateway.errors import pipeline_error
from producers.openai.convert import common_param
from schemas import ChatResponse, ErrorCode, ErrorInfo
from schemas.topics import spec

CAP = 4096
KEY = "sk-unit"


def _client() -> httpx.AsyncClient:
    settings = Settings(gateway_max_body_bytes=CAP, _env_file=None)  # type: ignore[call-arg]
    keys = ApiKeys({hashlib.sha256(KEY.encode()).hexdigest(): Principal("acme", "alice")})
    app = create_app(settings, keys)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


def _is_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def test_the_default_cap_is_the_requests_topics_event_limit() -> None:
    default = Settings(_env_file=None).gateway_max_body_bytes  # type: ignore[call-arg]
    assert default == spec("chat.requests").max_event_bytes


async def test_an_oversize_body_is_413_before_the_api_key_is_looked_at() -> None:
    async with _client() as http:
        big = b"x" * (CAP + 1)
        r = await http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert _is_openai_error(r, 413)["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(100):
                yield b"y" * 1000

        r = await http.post("/v1/chat/completions", content=chunks())
        assert "content-length" not in r.request.headers
        _is_openai_error(r, 413)
        # Just under the cap, still no key: the body is read and the answer is 401.
        r = await http.post("/v1/chat/completions", content=b"{}" + b" " * (CAP - 2))
        assert _is_openai_error(r, 401)["code"] == "invalid_api_key"


async def test_a_content_length_that_is_not_a_number_is_400() -> None:
    async with _client() as http:
        for value in ("\u00b2".encode("latin-1"), b"12abc", b"-1"):
            r = await http.post("/v1/chat/completions", content=b"{}", headers={"content-length": value})
            _is_openai_error(r, 400)
        # Digits beyond any int() we would want to parse are simply too large.
        r = await http.post("/v1/chat/completions", content=b"{}", headers={"content-length": b"9" * 5000})
        _is_openai_error(r, 413)


@pytest.mark.parametrize(
    ("body", "headers", "status", "param"),
    [
        (b"{not json", {}, 400, None),
        (b"[1, 2]", {}, 400, None),
        (b'"\\ud800"', {}, 400, None),
        (b"[" * 2000 + b"]" * 2000, {}, 400, None),
        (b'{"messages": "hi"}', {"content-type": "text/plain"}, 415, None),
        (b"messages=hi", {"content-type": "application/x-www-form-urlencoded"}, 415, None),
        (json.dumps({"messages": [{"role": "robot", "content": 5}]}).encode(), {}, 400, "messages.[0]"),
        (
            json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),
            {},
            400,
            "messages.[0].content",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": [5]}]}).encode(),
            {},
            400,
            "messages.[0].content",
        ),
        (json.dumps({"messages": []}).encode(), {}, 400, "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}], "stop": 5}).encode(), {}, 400, "stop"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}], "n": 9}).encode(), {}, 400, "n"),
    ],
)
async def test_input_errors_are_4xx_in_openai_shape(
    body: bytes, headers: dict[str, str], status: int, param: str | None
) -> None:
    async with _client() as http:
        r = await http.post(
            "/v1/chat/completions",
            content=body,
            headers={"authorization": f"Bearer {KEY}", "content-type": "application/json", **headers},
        )
        error = _is_openai_error(r, status)
        assert error["param"] == param
        assert error["type"] == "invalid_request_error"


async def test_unknown_routes_and_methods_answer_in_openai_shape() -> None:
    async with _client() as http:
        assert _is_openai_error(await http.get("/v1/nope"), 404)["code"] == "not_found"
        assert _is_openai_error(await http.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"


def test_common_param_names_the_field_a_union_error_is_about() -> None:
    assert common_param([("body", "stop", "str"), ("body", "stop", "list[str]")]) == "stop"
    assert common_param([("messages", 0, "role"), ("messages", 0, "content")]) == "messages.[0]"
    assert common_param([("messages", 1, "content"), ("n",)]) == "messages.[1].content"
    assert common_param([()]) is None


@pytest.mark.parametrize("code", list(ErrorCode))
def test_pipeline_errors_reach_the_client_as_a_generic_message_and_the_request_id(
    code: ErrorCode, caplog: pytest.LogCaptureFixture
) -> None:
    inside = "MilvusException: <code=1100> collection ragbus_chunks at 10.0.3.7:19530; CUDA OOM in torch"
    response = ChatResponse(
        request_id="req-42",
        tenant_id="acme",
        error=ErrorInfo(code=code, message=inside),
        finish_reason="error",
    )
    with caplog.at_level(logging.WARNING, logger="producers.gateway.errors"):
        status, body = pipeline_error(response)
    assert 400 <= status < 600
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Milvus" not in json.dumps(body) and "10.0.3.7" not in json.dumps(body)
    assert "request id req-42" in body["error"]["message"]
    assert inside in caplog.text and "req-42" in caplog.text  # the full text goes to the log
    client_side = {ErrorCode.INVALID_REQUEST, ErrorCode.CONTEXT_OVERFLOW, ErrorCode.UNKNOWN_MODEL}
    assert (status < 500) == (code in client_side | {ErrorCode.UNAUTHORIZED, ErrorCode.CANCELLED})
