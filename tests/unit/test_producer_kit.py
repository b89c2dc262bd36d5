"""What the producers share: one request builder, one OpenAI conversion for the gateway and bulk
jobs, and one reply reader's routing (fed records here; its Kafka side runs in the integration
tests of the chat client, bulk jobs and ingestion)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from infra.kafka.codec import encode
from infra.settings import Settings
from producers.bulk.formats import BulkItem, build_request, read_items
from producers.openai.convert import InvalidInput, parse_body, to_chat_request
from producers.replies import ReplyReader
from producers.requests import build_chat_request
from schemas import ChatResponse, EventBase, IngestResult, TokenChunk, utcnow


def test_the_builder_validates_and_sets_the_deadline_from_the_timeout() -> None:
    request = build_chat_request("q", tenant_id="acme", user_id="u", model="ragbus", timeout=30)
    assert request.model is None and request.lane == "chat" and request.sampling.max_tokens == 256
    assert request.deadline is not None
    assert timedelta(seconds=29) < request.deadline - utcnow() <= timedelta(seconds=30)
    assert build_chat_request("q", tenant_id="acme", user_id="u").deadline is None
    with pytest.raises(ValidationError):
        build_chat_request("q", tenant_id="acme", user_id="u", sampling={"temperature": 9})
    with pytest.raises(ValidationError):
        build_chat_request("", tenant_id="acme", user_id="u")


def test_a_batch_line_becomes_the_request_the_gateway_makes_of_the_same_body(tmp_path: Path) -> None:
    body = {
        "model": "ragbus",
        "messages": [
            {"role": "developer", "content": "terse"},
            {"role": "user", "content": "a?"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "text", "text": "c?"}]},
        ],
        "max_completion_tokens": 12,
        "top_p": 0.5,
        "seed": 7,
        "stop": "END",
        "user": "end-user-1",
        "stream": True,
    }
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"custom_id": "x", "body": body}) + "\n")
    (item,) = read_items(path)
    assert isinstance(item, BulkItem)
    bulk = build_request(item, request_id="r", tenant_id="acme", user_id="u", job_id="j")
    gateway = to_chat_request(parse_body(body), tenant_id="acme", user_id="u", timeout=60)
    same = ("question", "history", "system_prompt", "model", "sampling", "metadata")
    assert bulk.model_dump(include=set(same)) == gateway.model_dump(include=set(same))
    assert bulk.sampling.stop == ["END"] and bulk.sampling.max_tokens == 12 and bulk.question == "c?"
    assert bulk.metadata == {"api": "openai", "openai_user": "end-user-1"}
    # Token events exist on the chat lane only.
    assert (gateway.stream, bulk.stream) == (True, False)
    with pytest.raises(InvalidInput) as refused:
        to_chat_request(
            parse_body({**body, "max_tokens": 10**6, "max_completion_tokens": None}),
            tenant_id="a",
            user_id="u",
        )
    assert refused.value.param == "max_tokens"


@dataclass
class Record:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Any = ()
    partition: int = 0
    offset: int = 0
    timestamp: int = 0


def _record(topic: str, event: EventBase) -> Record:
    enc = encode(event)
    return Record(topic, enc.key, enc.value, enc.headers)


def test_the_reader_routes_by_request_id_and_skips_what_it_cannot_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(_env_file=None, tenant="t")  # type: ignore[call-arg]
    topics = settings.topics.tenant("t")
    models: dict[str, type[Any]] = {
        topics.responses("chat"): ChatResponse,
        topics.tokens: TokenChunk,
        topics.docs_ingested: IngestResult,
    }
    reader: ReplyReader[Any] = ReplyReader(settings, models, client_id="unit")
    mine = reader.register("r1")
    once: list[Any] = []
    reader.expect("d1", once.append, once=True)

    chunk = TokenChunk(request_id="r1", tenant_id="t", lane="chat", index=0, text="he")
    answer = ChatResponse(request_id="r1", tenant_id="t", lane="chat", answer="hello")
    other = ChatResponse(request_id="r2", tenant_id="t", lane="chat", answer="not yours")
    # Keyed by doc_id, not request_id: routed by the request_id inside.
    ingested = IngestResult(request_id="d1", tenant_id="t", doc_id="a.md", op="upsert", status="ok")
    with caplog.at_level(logging.WARNING, logger="producers.replies"):
        for record in [
            _record(topics.tokens, chunk),
            Record(topics.responses("chat"), b"r1", b"{not json"),
            Record(topics.responses("chat"), b"r1", None),
            _record(topics.responses("chat"), other),
            _record(topics.responses("chat"), answer),
            _record(topics.docs_ingested, ingested),
            _record(topics.docs_ingested, ingested),
        ]:
            reader._dispatch(record)  # noqa: SLF001 - the routing, without a broker
    assert [mine.get_nowait(), mine.get_nowait()] == [chunk, answer] and mine.empty()
    assert once == [ingested] and reader.waiting == 1
    assert sum("undecodable reply" in m for m in caplog.messages) == 2
    reader.unregister("r1")
    assert reader.waiting == 0


def test_the_reader_delivers_only_replies_read_from_its_tenants_topics_that_name_its_tenant(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reply with a request id the client sent is still not delivered when it was read from a
    topic the reader does not own (another tenant's), or names another tenant on the reader's."""
    settings = Settings(_env_file=None, tenant="acme")  # type: ignore[call-arg]
    acme, other = settings.topics.tenant("acme"), settings.topics.tenant("evil")
    reader: ReplyReader[Any] = ReplyReader(
        settings, {acme.responses("chat"): ChatResponse, acme.tokens: TokenChunk}, client_id="unit"
    )
    mine = reader.register("r1")
    forged = ChatResponse(request_id="r1", tenant_id="evil", lane="chat", answer="forged")
    claims_acme = ChatResponse(request_id="r1", tenant_id="acme", lane="chat", answer="forged too")
    token = TokenChunk(request_id="r1", tenant_id="evil", lane="chat", index=0, text="forged")
    answer = ChatResponse(request_id="r1", tenant_id="acme", lane="chat", answer="real")
    with caplog.at_level(logging.WARNING, logger="producers.replies"):
        for record in [
            _record(other.responses("chat"), claims_acme),  # another tenant's topic: not ours
            _record(other.tokens, token),
            _record(acme.responses("bulk"), claims_acme),  # not one of the reader's topics either
            _record(acme.responses("chat"), forged),  # on ours, but naming another tenant
            _record(acme.tokens, token),
            _record(acme.responses("chat"), answer),
        ]:
            reader._dispatch(record)  # noqa: SLF001 - the routing, without a broker
    assert mine.get_nowait() == answer and mine.empty()
    assert sum("names tenant 'evil'" in m for m in caplog.messages) == 2


def test_a_client_stamps_its_tenant_and_keeps_each_users_conversations_apart() -> None:
    """A client is one tenant's: every request it builds names that tenant, and its memory is
    keyed by (user, conversation), so the same conversation id of another user starts empty."""
    from producers.client import ChatClient

    client = ChatClient(Settings(_env_file=None, tenant="acme"))  # type: ignore[call-arg]
    assert set(client.replies.models) == {
        client.settings.topics.tenant("acme").responses("chat"),
        client.settings.topics.tenant("acme").tokens,
    }
    first = client.request("q1", user="alice", conversation_id="c")
    assert first.tenant_id == "acme" and first.history == []
    assert client.conversations is not None
    client.conversations.record(("alice", "c"), "q1", "a1")
    assert [m.content for m in client.request("q2", user="alice", conversation_id="c").history] == [
        "q1",
        "a1",
    ]
    assert client.request("q2", user="mallory", conversation_id="c").history == []
