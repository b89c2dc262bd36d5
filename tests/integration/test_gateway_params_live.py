"""Chat-completion parameters that change what the model does, through the real stack with the
official `openai` package: gateway, processors and inference worker (SmolLM2-135M on llama.cpp) run
as the `ragbus` processes a user starts, against the session's broker and Postgres.

What each must show in the result: `response_format` json_schema answers that parse and validate
against the schema (the grammar holds even a 135M model to it), `n=2` two choices, `logprobs` with
`top_logprobs` per token, `stop` cutting the answer; and the combinations ragbus does not serve are
a 400 naming the parameter. The tenant has no documents, so prompts are short and answers quick.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.integration.pipeline_support import (
    running_with_gateway,
)
from tests.provision import KafkaService, PostgresService

KEY = "sk-params-" + uuid.uuid4().hex
TENANT = "paramsco"
QUESTION = "What is the capital of France? Answer in one sentence."
JSON_QUESTION = 'What is the capital of France? Reply with a JSON object such as {"capital": "..."}.'
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "confident": {"type": "boolean"},
    },
    "required": ["city", "country", "confident"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
async def gateway_url(
    kafka: KafkaService, postgres: PostgresService, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    root = tmp_path_factory.mktemp("params")
    async with running_with_gateway(
        kafka, postgres, root, keys=[(KEY, TENANT, "alice")], tenants=(TENANT,)
    ) as (url, _):
        yield url


def _ask(url: str, question: str = QUESTION, **params: Any) -> Any:
    """One chat completion with the synchronous client, in a thread (it blocks)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=240, max_retries=0)
    messages: Any = [{"role": "user", "content": question}]
    return asyncio.to_thread(client.chat.completions.create, model="ragbus", messages=messages, **params)


async def test_json_schema_answers_parse_and_validate(gateway_url: str) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "capital", "schema": SCHEMA, "strict": True}}
    answer = await _ask(gateway_url, max_tokens=64, response_format=fmt)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", answer
    parsed = json.loads(choice.message.content)
    jsonschema.validate(parsed, SCHEMA)

    # Any JSON object, and two samples of one under a schema: each parses and validates.
    obj = await _ask(gateway_url, JSON_QUESTION, max_tokens=64, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop", obj
    assert isinstance(json.loads(obj.choices[0].message.content), dict), obj
    two = await _ask(gateway_url, max_tokens=64, response_format=fmt, n=2, temperature=0.8, seed=11)
    assert len(two.choices) == 2
    for c in two.choices:
        if c.finish_reason == "stop":  # a sample that ran out of tokens is cut, as OpenAI's
            jsonschema.validate(json.loads(c.message.content), SCHEMA)


async def test_n_gives_n_choices(gateway_url: str) -> None:
    answer = await _ask(gateway_url, n=2, max_tokens=12, temperature=1.0, seed=5)
    assert [c.index for c in answer.choices] == [0, 1], answer
    assert all(c.message.content for c in answer.choices)
    # Both samples' tokens are counted, the prompt once.
    assert answer.usage.completion_tokens >= 2
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


async def test_logprobs_with_top_logprobs_are_visible(gateway_url: str) -> None:
    answer = await _ask(gateway_url, max_tokens=8, logprobs=True, top_logprobs=2)
    choice = answer.choices[0]
    content = choice.logprobs.content
    assert content and len(content) <= 8, answer
    for entry in content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.bytes == list(entry.token.encode()) or "\ufffd" in entry.token
        # Greedy decoding picks the likeliest token: the first alternative is the token itself.
        assert entry.top_logprobs[0].token == entry.token
    assert "".join(e.token for e in content).strip() == choice.message.content
    # Not from the answer cache: an entry holds no logprobs.
    again = await _ask(gateway_url, max_tokens=8, logprobs=True, top_logprobs=2)
    assert again.model_extra["ragbus"]["cached"] is False
    assert [e.token for e in again.choices[0].logprobs.content] == [e.token for e in content]
    plain = await _ask(gateway_url, max_tokens=8)
    assert plain.choices[0].logprobs is None


async def test_stop_cuts_the_answer(gateway_url: str) -> None:
    full = (await _ask(gateway_url, max_tokens=24)).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = await _ask(gateway_url, max_tokens=24, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)].strip(), (full, stop)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"n": 2, "stream": True}, "n"),
        ({"logprobs": True, "stream": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "response_format.json_schema.schema",
        ),
    ],
)
async def test_what_is_not_served_is_a_400_naming_it(
    gateway_url: str, params: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await _ask(gateway_url, max_tokens=8, **params)
    body: Any = err.value.body
    assert body["param"] == param, body
