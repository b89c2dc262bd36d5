"""POST /v1/embeddings with the official `openai` client against the real gateway (its app served by
uvicorn, started with its lifespan against the session's broker), given the processors' embedding
loader as `ragbus gateway` gives it: the vectors must be the processors' own for the same texts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from infra.kafka.topics import declare_topics
from infra.settings import Settings
from processors.embedding import Embedder, load_model
from producers.gateway.app import create_app
from producers.gateway.auth import ApiKeys, Principal
from producers.gateway.embeddings import EMBEDDING_ALIAS
from tests.helpers import serve_app

KEY = "sk-embed-test"
TEXTS = [
    "How long must passwords be?",
    "Les mots de passe doivent comporter au moins douze caractères.",
    "数据库备份每天凌晨两点运行。",
    # Longer than the model's window (256 word pieces): cut the same way in both places.
    " ".join(f"clause {i} of the retention policy applies to archived tickets" for i in range(80)),
]


class Gateway:
    def __init__(self, url: str, settings: Settings) -> None:
        self.url, self.settings = url, settings


@pytest.fixture
async def gateway(base_settings: Settings) -> AsyncIterator[Gateway]:
    settings = base_settings
    await declare_topics(settings)
    keys = ApiKeys({hashlib.sha256(KEY.encode()).hexdigest(): Principal("acme", "alice")})
    # What cli/client.py hands the gateway.
    app = create_app(settings, keys, embedder=lambda: Embedder.from_settings(settings))
    async with serve_app(app) as url:
        yield Gateway(url, settings)


@pytest.fixture(scope="module")
def reference() -> Embedder:
    """The processors' embedder, loaded on its own."""
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    return Embedder.from_settings(settings, load_model(settings.embedding_model))


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    return np.asarray(np.sum(got * want, axis=1))


async def test_embeddings_equal_the_processors_vectors(gateway: Gateway, reference: Embedder) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        # The first request loads the model on a worker thread: the gateway keeps answering meanwhile.
        first = asyncio.create_task(
            client.embeddings.create(model=EMBEDDING_ALIAS, input=TEXTS, encoding_format="float")
        )
        await asyncio.sleep(0.05)
        started = time.monotonic()
        health = await http.get("/healthz")
        assert health.status_code == 200 and time.monotonic() - started < 1.0
        floats = await first

    want = await reference.encode(TEXTS)
    assert want.shape == (len(TEXTS), 384)
    got = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert got.shape == (len(TEXTS), 384)
    assert [d.index for d in floats.data] == list(range(len(TEXTS)))
    assert np.all(_cosines(got, want) > 0.9999), _cosines(got, want)
    assert floats.model == gateway.settings.embedding_model

    tokenizer = reference.model.tokenizer
    tokens = tokenizer(TEXTS, truncation=True, max_length=reference.model.max_seq_length)["input_ids"]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(len(t) for t in tokens)
    assert len(tokens[-1]) == reference.model.max_seq_length  # the long text was cut, and counted so

    # base64: little-endian float32, exactly the numbers of the float answer.
    raw = await client.embeddings.create(
        model=gateway.settings.embedding_model, input=TEXTS, encoding_format="base64", dimensions=384
    )
    decoded = np.array([np.frombuffer(base64.b64decode(str(d.embedding)), dtype="<f4") for d in raw.data])
    np.testing.assert_array_equal(decoded, got)
    # The client's default asks for base64 and decodes it itself.
    default = await client.embeddings.create(model=EMBEDDING_ALIAS, input=TEXTS[0])
    # (one text alone is padded differently from a batch of four: equal up to float noise)
    alone = np.array([default.data[0].embedding], dtype=np.float32)
    assert alone.shape == (1, 384) and _cosines(alone, want[:1])[0] > 0.9999

    names = {m.id async for m in client.models.list()}
    assert {EMBEDDING_ALIAS, gateway.settings.embedding_model} <= names


async def test_refusals_name_the_parameter(gateway: Gateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    cases: list[tuple[dict[str, Any], type[openai.APIStatusError], str]] = [
        ({"model": EMBEDDING_ALIAS, "input": "a", "dimensions": 128}, openai.BadRequestError, "dimensions"),
        ({"model": EMBEDDING_ALIAS, "input": [[101, 2054]]}, openai.BadRequestError, "input"),
        ({"model": "text-embedding-3-small", "input": "a"}, openai.NotFoundError, "model"),
    ]
    for kwargs, error, param in cases:
        with pytest.raises(error) as err:
            await client.embeddings.create(**kwargs)
        body: Any = err.value.body
        assert body["param"] == param, body
    bad = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.embeddings.create(model=EMBEDDING_ALIAS, input="a")
