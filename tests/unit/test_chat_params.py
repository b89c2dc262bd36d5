"""`n`, `logprobs`/`top_logprobs` and `response_format`: from the OpenAI body onto the contract (and
refused by name where ragbus does not serve them), the contract's own bounds on untrusted events,
the answer cache's rule, the grammar a format compiles to, and the OpenAI choices of an answer."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from inference_workers.cache import cache_key, cacheable
from inference_workers.engines.grammar import GrammarError, grammar_for
from producers.bulk.formats import output_line
from producers.openai.convert import InvalidInput, parse_body, to_chat_request, to_choices
from schemas import (
    AnswerChoice,
    ChatResponse,
    ResponseFormat,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    limits,
)

Q = [{"role": "user", "content": "q"}]
SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
    "required": ["a"],
}


def _request(**body: Any) -> Any:
    return to_chat_request(parse_body({"messages": Q, **body}), tenant_id="t", user_id="u")


def test_the_parameters_reach_the_contract() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    s = _request(n=3, logprobs=True, top_logprobs=4, response_format=fmt).sampling
    assert (s.n, s.logprobs, s.top_logprobs) == (3, True, 4)
    assert s.response_format == ResponseFormat(
        type="json_schema", name="thing", json_schema=SCHEMA, strict=True
    )
    assert _request(response_format={"type": "json_object"}).sampling.response_format.type == "json_object"
    # A json_schema without a schema asks for any object; text asks for nothing.
    bare = {"type": "json_schema", "json_schema": {"name": "x"}}
    assert _request(response_format=bare).sampling.response_format.type == "json_object"
    assert _request(response_format={"type": "text"}).sampling.response_format is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2, "stream": True}, "n"),
        ({"logprobs": True, "stream": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 2, "logprobs": False}, "top_logprobs"),
        ({"n": limits.CHOICES_MAX + 1}, "n"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),  # a boolean is not a number
        ({"logprobs": 0}, "logprobs"),  # nor a number a boolean
        ({"logprobs": True, "top_logprobs": limits.TOP_LOGPROBS_MAX + 1}, "top_logprobs"),
        # n * max_tokens * (top_logprobs + 1) entries would not fit a response event.
        ({"logprobs": True, "top_logprobs": 20, "n": 8, "max_tokens": 1024}, "logprobs"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_object", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "bad name", "schema": SCHEMA},
                }
            },
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "y": 1},
                }
            },
            "response_format.json_schema.y",
        ),
    ],
)
def test_what_is_not_served_names_its_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidInput) as err:
        _request(**body)
    assert err.value.param == param, str(err.value)


def test_a_schema_too_large_or_too_deep_is_refused_by_the_contract() -> None:
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(limits.JSON_SCHEMA_DEPTH_MAX):
        deep = {"type": "object", "properties": {"x": deep}}
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}}
    for schema in (deep, wide):
        with pytest.raises(InvalidInput) as err:
            _request(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert err.value.param == "response_format"
    # The bus is untrusted: the contract holds the same bounds on its own.
    with pytest.raises(ValidationError):
        SamplingParams(response_format={"type": "json_schema", "json_schema": deep})
    with pytest.raises(ValidationError):
        SamplingParams(response_format={"type": "text", "json_schema": SCHEMA})
    with pytest.raises(ValidationError):
        SamplingParams(top_logprobs=1)


def test_the_cache_skips_several_choices_and_logprobs_and_keys_on_the_format() -> None:
    assert cacheable(SamplingParams())
    assert not cacheable(SamplingParams(n=2))
    assert not cacheable(SamplingParams(logprobs=True))
    assert cacheable(SamplingParams(response_format={"type": "json_object"}))

    def key(s: SamplingParams) -> str:
        return cache_key(model="m", tenant_id="t", prompt="p", chunks=[], sampling=s)

    formats = [
        SamplingParams(),
        SamplingParams(response_format={"type": "json_object"}),
        SamplingParams(response_format={"type": "json_schema", "json_schema": SCHEMA}),
    ]
    assert len({key(s) for s in formats}) == 3


def test_a_format_compiles_to_a_grammar_whose_strings_hold_no_raw_control_characters() -> None:
    assert grammar_for(None) is None
    assert grammar_for(ResponseFormat(type="text")) is None
    for fmt in (ResponseFormat(type="json_object"), ResponseFormat(type="json_schema", json_schema=SCHEMA)):
        gbnf = grammar_for(fmt)
        assert gbnf is not None and "root ::=" in gbnf
        assert 'char ::= [^"\\\\\\x7F\\x00-\\x1F]' in gbnf, gbnf
    with pytest.raises(GrammarError):
        grammar_for(ResponseFormat(type="json_schema", json_schema={"$ref": "#/nowhere"}))


def _response(**fields: Any) -> ChatResponse:
    return ChatResponse(tenant_id="t", request_id="r", answer="hi", finish_reason="stop", **fields)


def test_choices_and_logprobs_in_openai_shape() -> None:
    assert [c.model_dump() for c in to_choices(_response())] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    entry = TokenLogprob(
        token="hi",
        logprob=-0.5,
        bytes=b"hi",
        top_logprobs=[TopLogprob(token="hi", logprob=-0.5, bytes=b"hi")],
    )
    response = _response(
        choices=[
            AnswerChoice(index=0, text="hi", logprobs=[entry]),
            AnswerChoice(index=1, text="yo", finish_reason="length", logprobs=[]),
        ]
    )
    # Through the bus and back: the bytes travel as base64 and come out as OpenAI's integers.
    again = ChatResponse.model_validate_json(response.model_dump_json())
    choices = [c.model_dump() for c in to_choices(again)]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "hi", "stop"),
        (1, "yo", "length"),
    ]
    assert choices[0]["logprobs"]["content"] == [
        {
            "token": "hi",
            "logprob": -0.5,
            "bytes": [104, 105],
            "top_logprobs": [{"token": "hi", "logprob": -0.5, "bytes": [104, 105]}],
        }
    ]
    line = json.loads(output_line("a", again))
    assert [c["index"] for c in line["response"]["body"]["choices"]] == [0, 1]


def test_a_logprob_entry_is_bounded() -> None:
    with pytest.raises(ValidationError):
        TokenLogprob(token="x", logprob=float("-inf"))
    with pytest.raises(ValidationError):
        TokenLogprob(token="x" * (limits.TOKEN_TEXT_MAX + 1), logprob=-1.0)
    with pytest.raises(ValidationError):
        AnswerChoice(index=limits.CHOICES_MAX, text="x")
