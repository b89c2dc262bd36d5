"""Which OpenAI parameters the gateway honours, accepts only at their neutral value, or refuses by
name; the /v1/embeddings refusals that come before the model is needed; the OpenAPI document and
the /metrics switch. On the real app object without a broker (no lifespan runs): everything here is
answered before the app would touch Kafka."""

from __future__ import annotations

import hashlib
import json
import typing
from typing import Any

import httpx
import pytest
from openai.types.chat.completion_create_params import CompletionCreateParamsBase
from openai.types.embedding_create_params import EmbeddingCreateParams

from infra.settings import Settings
from producers.bulk.formats import BadLine, parse_openai_line
from producers.gateway.app import create_app
from producers.gateway.auth import ApiKeys, Principal
from producers.gateway.embeddings import EMBEDDING_ALIAS, MAX_INPUTS
from producers.openai.convert import InvalidInput, parse_body, to_chat_request
from producers.openai.protocol import NEUTRAL_PARAMS, ChatCompletionRequest, EmbeddingRequest
from schemas import limits

KEY = "sk-unit"
AUTH = {"authorization": f"Bearer {KEY}"}
Q = [{"role": "user", "content": "q"}]


def _app(**settings: Any) -> Any:
    s = Settings(_env_file=None, **settings)  # type: ignore[call-arg]
    keys = ApiKeys({hashlib.sha256(KEY.encode()).hexdigest(): Principal("acme", "alice")})

    def never() -> Any:  # every request here is answered before the model would be needed
        raise AssertionError("the embedding model was loaded for a request refused before it")

    return create_app(s, keys, embedder=never)


def _client(**settings: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(**settings)), base_url="http://gw")


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def test_every_openai_chat_parameter_is_honoured_or_has_a_neutral_value() -> None:
    """The installed openai client's own list of parameters: none falls through to `unknown`."""
    openai_params = set(typing.get_type_hints(CompletionCreateParamsBase, include_extras=False))
    decided = set(ChatCompletionRequest.model_fields) | set(NEUTRAL_PARAMS)
    assert openai_params - decided == set()
    assert set(ChatCompletionRequest.model_fields).isdisjoint(NEUTRAL_PARAMS)
    embed_params = set(typing.get_type_hints(EmbeddingCreateParams, include_extras=False))
    assert embed_params == set(EmbeddingRequest.model_fields)


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("logit_bias", {"50256": -100}),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"),
        ("tool_choice", {"type": "function", "function": {"name": "f"}}),
        ("functions", [{"name": "f"}]),
        ("function_call", {"name": "f"}),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("store", True),
        ("reasoning_effort", "high"),
        ("service_tier", "flex"),
        ("web_search_options", {}),
        ("verbosity", "low"),
        ("moderation", {"input": {"mode": "block"}}),
    ],
)
async def test_unsupported_values_are_a_400_naming_the_parameter(param: str, value: Any) -> None:
    async with _client() as http:
        r = await http.post("/v1/chat/completions", json={"messages": Q, param: value}, headers=AUTH)
    error = _error(r, 400)
    assert error["param"] == param
    assert error["code"] == "unsupported_parameter"
    assert error["type"] == "invalid_request_error"
    assert f"`{param}` is not supported" in error["message"]


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("n", 1),
        ("presence_penalty", 0),
        ("frequency_penalty", 0.0),
        ("logit_bias", {}),
        ("logprobs", False),
        ("top_logprobs", 0),
        ("response_format", {"type": "text"}),
        ("tools", []),
        ("tool_choice", "none"),
        ("tool_choice", "auto"),
        ("parallel_tool_calls", True),
        ("modalities", ["text"]),
        ("store", False),
        ("service_tier", "auto"),
        ("reasoning_effort", None),
        ("audio", None),
    ],
)
def test_neutral_values_are_accepted_and_change_nothing(param: str, value: Any) -> None:
    plain = to_chat_request(parse_body({"messages": Q}), tenant_id="t", user_id="u", request_id="r")
    with_param = to_chat_request(
        parse_body({"messages": Q, param: value}), tenant_id="t", user_id="u", request_id="r"
    )
    keep = {"created_at", "deadline", "event_id"}
    assert with_param.model_dump(exclude=keep) == plain.model_dump(exclude=keep)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": Q, "temprature": 0.5}, "temprature"),
        ({"messages": Q, "best_of": 2, "echo": True}, "best_of"),
        ({"messages": [{"role": "user", "content": "q", "weight": 1}]}, "messages.[0].weight"),
        (
            {"messages": Q, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
            "stream_options.x",
        ),
    ],
)
async def test_unknown_fields_are_a_400_naming_them(body: dict[str, Any], param: str) -> None:
    async with _client() as http:
        r = await http.post("/v1/chat/completions", json=body, headers=AUTH)
    error = _error(r, 400)
    assert (error["param"], error["code"]) == (param, "unknown_parameter")
    assert f"`{param}`" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "q", "name": "bob"}]}, "messages.[0].name"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]},
                    {"role": "user", "content": "b"},
                ]
            },
            "messages.[1].tool_calls",
        ),
        ({"messages": Q, "stream": True, "stream_options": {"include_obfuscation": True}}, None),
    ],
)
def test_message_and_stream_option_fields_follow_the_same_rules(
    body: dict[str, Any], param: str | None
) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_body(body)
    assert err.value.code == "unsupported_parameter"
    assert err.value.param == (param or "stream_options.include_obfuscation")


def test_an_assistant_turn_echoed_back_by_the_openai_client_is_accepted() -> None:
    # What `completion.choices[0].message.model_dump()` gives: every optional field, as null.
    echoed = {
        "role": "assistant",
        "content": "earlier answer",
        "refusal": None,
        "audio": None,
        "function_call": None,
        "tool_calls": None,
        "annotations": None,
    }
    with pytest.raises(InvalidInput) as err:  # annotations is not a request field at all
        parse_body({"messages": [{"role": "user", "content": "a"}, echoed, {"role": "user", "content": "b"}]})
    assert err.value.param == "messages.[1].annotations"
    echoed.pop("annotations")
    body = parse_body(
        {"messages": [{"role": "user", "content": "a"}, echoed, {"role": "user", "content": "b"}]}
    )
    request = to_chat_request(body, tenant_id="t", user_id="u")
    assert [m.content for m in request.history] == ["a", "earlier answer"]


def test_honoured_parameters_reach_the_contract() -> None:
    body = parse_body(
        {
            "messages": Q,
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "temperature": 0.3,
            "top_p": 0.9,
            "seed": 7,
            "stop": "END",
            "user": "end-user",
            "safety_identifier": "hash-1",
            "metadata": {"team": "search"},
            "prompt_cache_key": "k",
        }
    )
    r = to_chat_request(body, tenant_id="t", user_id="u")
    s = r.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop) == (20, 0.3, 0.9, 7, ["END"])
    assert r.metadata == {
        "api": "openai",
        "openai_user": "end-user",
        "openai_safety_identifier": "hash-1",
        "openai_metadata.team": "search",
    }
    only_new = to_chat_request(
        parse_body({"messages": Q, "max_completion_tokens": 5}), tenant_id="t", user_id="u"
    )
    assert only_new.sampling.max_tokens == 5


def test_openai_metadata_bounds_are_kept() -> None:
    for bad in ({str(i): "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, {"k": 5}):
        with pytest.raises(InvalidInput) as err:
            parse_body({"messages": Q, "metadata": bad})
        assert str(err.value.param).startswith("metadata"), bad


def test_a_bulk_line_with_an_unsupported_parameter_is_an_error_line_naming_it() -> None:
    line = json.dumps({"custom_id": "a", "body": {"messages": Q, "presence_penalty": 1}})
    with pytest.raises(BadLine) as err:
        parse_openai_line(line, 1)
    assert (err.value.custom_id, err.value.param) == ("a", "presence_penalty")
    assert "`presence_penalty` is not supported" in str(err.value)


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": EMBEDDING_ALIAS, "input": [1, 2, 3]}, 400, "input", "unsupported_parameter"),
        ({"model": EMBEDDING_ALIAS, "input": [[1, 2], [3]]}, 400, "input", "unsupported_parameter"),
        ({"model": EMBEDDING_ALIAS, "input": []}, 400, "input", None),
        ({"model": EMBEDDING_ALIAS, "input": ""}, 400, "input", None),
        ({"model": EMBEDDING_ALIAS, "input": ["a", None]}, 400, "input", None),
        ({"model": EMBEDDING_ALIAS, "input": ["a"] * (MAX_INPUTS + 1)}, 400, "input", None),
        ({"model": EMBEDDING_ALIAS, "input": "x" * (limits.QUESTION_MAX + 1)}, 400, "input", None),
        ({"model": EMBEDDING_ALIAS, "input": "a", "encoding_format": "int8"}, 400, "encoding_format", None),
        ({"model": EMBEDDING_ALIAS, "input": "a", "dimensions": 0}, 400, "dimensions", None),
        ({"model": EMBEDDING_ALIAS, "input": "a", "truncate": True}, 400, "truncate", "unknown_parameter"),
        ({"input": "a"}, 400, "model", None),
        ({"model": "text-embedding-3-small", "input": "a"}, 404, "model", "model_not_found"),
    ],
)
async def test_embedding_requests_are_refused_before_the_model_is_loaded(
    body: dict[str, Any], status: int, param: str, code: str | None
) -> None:
    async with _client() as http:
        r = await http.post("/v1/embeddings", content=json.dumps(body), headers=AUTH)
    error = _error(r, status)
    assert (error["param"], error["code"]) == (param, code)


async def test_embeddings_need_a_key_and_json() -> None:
    async with _client() as http:
        assert _error(await http.post("/v1/embeddings", json={"model": "x", "input": "a"}), 401)
        r = await http.post(
            "/v1/embeddings", content=b"input=a", headers={**AUTH, "content-type": "text/plain"}
        )
        assert _error(r, 415)["code"] == "unsupported_media_type"
        assert (
            _error(await http.post("/v1/embeddings", content=b"{", headers=AUTH), 400)["code"]
            == "invalid_json"
        )


async def test_metrics_need_a_key_by_default_and_can_be_opened_or_turned_off() -> None:
    async with _client() as http:
        assert _error(await http.get("/metrics"), 401)["code"] == "invalid_api_key"
        r = await http.get("/metrics", headers=AUTH)
        assert r.status_code == 200 and b"ragbus_gateway_requests" in r.content
        assert r.headers["content-type"].startswith("text/plain")
    async with _client(gateway_metrics="open") as http:
        r = await http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    async with _client(gateway_metrics="off") as http:
        assert _error(await http.get("/metrics", headers=AUTH), 404)["code"] == "not_found"


def test_the_openapi_document_lists_each_routes_statuses_and_content_types() -> None:
    paths = _app().openapi()["paths"]
    expected = {
        ("/v1/chat/completions", "post"): {200, 400, 401, 403, 404, 413, 415, 429, 499, 500, 503, 504},
        ("/v1/embeddings", "post"): {200, 400, 401, 404, 413, 415, 500, 503},
        ("/v1/models", "get"): {200, 400, 401, 413, 500},
        ("/healthz", "get"): {200, 400, 413, 500, 503},
        ("/metrics", "get"): {200, 400, 401, 404, 413, 500},
    }
    for (path, method), statuses in expected.items():
        responses = paths[path][method]["responses"]
        assert {int(s) for s in responses} == statuses, path
        for status, response in responses.items():
            if int(status) >= 400 and (path, status) != ("/healthz", "503"):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "ErrorBody" in _app().openapi()["components"]["schemas"]
    chat_200 = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat_200) == {"application/json", "text/event-stream"}


async def test_a_model_that_fails_to_load_is_a_503_and_the_next_request_tries_again() -> None:
    calls = 0

    def broken() -> Any:
        nonlocal calls
        calls += 1
        raise OSError("no such model directory")

    s = Settings(_env_file=None)  # type: ignore[call-arg]
    keys = ApiKeys({hashlib.sha256(KEY.encode()).hexdigest(): Principal("acme", "alice")})
    app = create_app(s, keys, embedder=broken)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        for _ in range(2):
            r = await http.post("/v1/embeddings", json={"model": EMBEDDING_ALIAS, "input": "a"}, headers=AUTH)
            error = _error(r, 503)
            assert error["code"] == "model_unavailable" and "no such model" not in error["message"]
    assert calls == 2
