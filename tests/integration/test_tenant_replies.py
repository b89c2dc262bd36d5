"""Replies reach only the tenant that asked, on the session's real broker: the chat client, bulk
jobs and the gateway each act as one tenant, write its request topics and read only its reply
topics, and deliver a reply only for a request id they sent.

No processors run here: the test writes the replies itself, as the pipeline would (and as a
forger would), so what is checked is the producing side alone — which replies it accepts. The
same isolation through the whole pipeline is in test_e2e.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import httpx

from infra.kafka.clients import make_producer
from infra.kafka.codec import encode
from infra.kafka.topics import declare_topics
from infra.secrets import as_tenant
from infra.settings import Settings
from producers.bulk.runner import BulkRunner, request_id_for
from producers.bulk.state import JobState, JobStore
from producers.client import ChatClient
from producers.gateway.app import create_app
from producers.gateway.auth import ApiKeys, Principal
from schemas import ChatRequest, ChatResponse, EventBase, TokenChunk
from tests.helpers import read_events, serve_app, wait_for

TENANTS = ("acme", "t")


async def _declared(settings: Settings) -> Settings:
    await declare_topics(settings, tenants=TENANTS)
    return settings


async def _produce(settings: Settings, items: Sequence[tuple[str, EventBase]]) -> None:
    """Write each event on its topic, in order (a reply keyed by the same request id lands on the
    same partition, so a forged reply written first is read before the genuine one)."""
    producer = make_producer(settings, client_id="forger")
    await producer.start()
    try:
        for topic, event in items:
            enc = encode(event)
            await producer.send_and_wait(topic, enc.value, key=enc.key, headers=enc.headers)
    finally:
        await producer.stop()


async def _sent(settings: Settings, topic: str, n: int) -> list[ChatRequest]:
    async def found() -> list[ChatRequest] | None:
        got = await read_events(settings, topic, ChatRequest, timeout=5)
        return got if len(got) >= n else None

    return await wait_for(found, timeout=60, interval=0.2, what=f"{n} request(s) on {topic}")


async def test_a_forged_response_with_a_request_id_the_client_sent_is_never_delivered(
    base_settings: Settings,
) -> None:
    s = await _declared(base_settings)
    acme, other = s.topics.tenant("acme"), s.topics.tenant("t")
    async with ChatClient(as_tenant(s, "acme")) as client:
        asked = asyncio.create_task(client.ask("What is the code of the vault?", user="alice", timeout=60))
        (request,) = await _sent(s, acme.requests("chat"), 1)
        assert (request.tenant_id, request.user_id) == ("acme", "alice")
        assert await read_events(s, other.requests("chat"), ChatRequest, timeout=2) == []
        rid = request.request_id
        await _produce(
            s,
            [
                # Another tenant's topics, the request id the client sent: never read at all.
                (other.responses("chat"), ChatResponse(request_id=rid, tenant_id="t", answer="forged: t")),
                (
                    other.responses("chat"),
                    ChatResponse(request_id=rid, tenant_id="acme", answer="forged: claims"),
                ),
                (other.tokens, TokenChunk(request_id=rid, tenant_id="t", index=0, text="forged")),
                # The client's own topic, but naming another tenant: read, and refused.
                (
                    acme.responses("chat"),
                    ChatResponse(request_id=rid, tenant_id="t", answer="forged: names t"),
                ),
                # A reply for an id the client never sent.
                (acme.responses("chat"), ChatResponse(request_id="never-sent", tenant_id="acme", answer="x")),
            ],
        )
        await asyncio.sleep(1.5)  # the reader has read its topics up to here by now
        assert not asked.done(), asked.result()
        await _produce(
            s, [(acme.responses("chat"), ChatResponse(request_id=rid, tenant_id="acme", answer="42"))]
        )
        response = await asyncio.wait_for(asked, 30)
        assert response.answer == "42" and response.tenant_id == "acme"
        assert client.replies.alive and client.replies.waiting == 0


async def test_a_stream_never_yields_tokens_of_another_tenants_topic(base_settings: Settings) -> None:
    s = await _declared(base_settings)
    acme, other = s.topics.tenant("acme"), s.topics.tenant("t")
    async with ChatClient(as_tenant(s, "acme")) as client:
        stream = client.stream("Tell me a secret", timeout=60)

        async def collect() -> list[str]:
            return [text async for text in stream]

        reading = asyncio.create_task(collect())
        (request,) = await _sent(s, acme.requests("chat"), 1)
        rid = request.request_id
        await _produce(
            s,
            [
                (other.tokens, TokenChunk(request_id=rid, tenant_id="t", index=0, text="FORGED ")),
                (acme.tokens, TokenChunk(request_id=rid, tenant_id="t", index=0, text="FORGED ")),
                (acme.tokens, TokenChunk(request_id=rid, tenant_id="acme", index=0, text="real ")),
                (other.responses("chat"), ChatResponse(request_id=rid, tenant_id="t", answer="FORGED")),
                (acme.tokens, TokenChunk(request_id=rid, tenant_id="acme", index=1, text="answer")),
                (
                    acme.responses("chat"),
                    ChatResponse(request_id=rid, tenant_id="acme", answer="real answer"),
                ),
            ],
        )
        assert await asyncio.wait_for(reading, 30) == ["real ", "answer"]
        assert stream.response is not None and stream.response.answer == "real answer"


async def test_two_tenants_with_the_same_job_and_custom_ids_get_only_their_own_answers(
    base_settings: Settings, tmp_path: Path
) -> None:
    s = await _declared(base_settings)
    questions = tmp_path / "questions.txt"
    questions.write_text("What is our refund policy?\nWho approves travel?\nWhere is the office?\n")
    cids = ["line-1", "line-2", "line-3"]
    runs: dict[str, asyncio.Task[JobState]] = {}
    for tenant in TENANTS:
        state = JobState(
            job_id="same-job",
            input=str(questions),
            output=str(tmp_path / f"{tenant}.jsonl"),
            input_format="text",
            tenant_id=tenant,
            user_id="u",
            total=len(cids),
        )
        runner = BulkRunner(as_tenant(s, tenant), state, JobStore(s.home, tenant), progress=False)
        runs[tenant] = asyncio.create_task(runner.run())
    sent = {t: await _sent(s, s.topics.tenant(t).requests("bulk"), len(cids)) for t in TENANTS}
    for tenant, requests in sent.items():
        assert {(r.tenant_id, r.job_id) for r in requests} == {(tenant, "same-job")}
        assert {r.request_id: r.custom_id for r in requests} == {
            request_id_for(tenant, "same-job", c): c for c in cids
        }
    acme_ids = {r.request_id for r in sent["acme"]}
    assert acme_ids.isdisjoint(r.request_id for r in sent["t"])

    # Each tenant's answers on its own responses topic, and on each topic first an answer to the
    # other tenant's requests (as a processor answering the wrong topic, or a forger, would write).
    replies: list[tuple[str, EventBase]] = []
    for tenant, requests in sent.items():
        rival = "t" if tenant == "acme" else "acme"
        topic = s.topics.tenant(rival).responses("bulk")
        for r in requests:
            replies.append(
                (topic, ChatResponse(request_id=r.request_id, tenant_id=rival, lane="bulk", answer="WRONG"))
            )
    for tenant, requests in sent.items():
        topic = s.topics.tenant(tenant).responses("bulk")
        for r in requests:
            answer = f"{tenant} answers {r.custom_id}"
            replies.append(
                (topic, ChatResponse(request_id=r.request_id, tenant_id=tenant, lane="bulk", answer=answer))
            )
    await _produce(s, replies)

    for tenant in TENANTS:
        final = await asyncio.wait_for(runs[tenant], 60)
        assert final.status == "completed" and final.answered == len(cids) and final.errors == 0
        rows = [json.loads(line) for line in (tmp_path / f"{tenant}.jsonl").read_text().splitlines()]
        got = {row["custom_id"]: row["response"]["body"]["choices"][0]["message"]["content"] for row in rows}
        assert got == {c: f"{tenant} answers {c}" for c in cids}
        # Two jobs, kept apart: neither tenant's store holds the other's.
        assert JobStore(s.home, tenant).load("same-job").tenant_id == tenant  # type: ignore[union-attr]
        assert JobStore(s.home, tenant).sent_ids("same-job") == set(cids)


KEYS = {
    "sk-acme": Principal("acme", "alice"),
    "sk-t": Principal("t", "bob"),
    "sk-ghost": Principal("ghost", "g"),
}


async def test_gateway_keys_of_two_tenants_each_see_only_their_own_replies(base_settings: Settings) -> None:
    s = await _declared(base_settings.model_copy(update={"gateway_timeout_s": 30.0}))
    keys = ApiKeys({hashlib.sha256(k.encode()).hexdigest(): p for k, p in KEYS.items()})
    app = create_app(s, keys)
    body = {"model": "ragbus", "messages": [{"role": "user", "content": "What is my balance?"}]}
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def ask(key: str) -> httpx.Response:
            return await http.post(
                "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
            )

        calls = {key: asyncio.create_task(ask(key)) for key in ("sk-acme", "sk-t")}
        requests = {t: (await _sent(s, s.topics.tenant(t).requests("chat"), 1))[0] for t in TENANTS}
        assert {t: (r.tenant_id, r.user_id) for t, r in requests.items()} == {
            "acme": ("acme", "alice"),
            "t": ("t", "bob"),
        }
        # First, each request answered on the OTHER tenant's topic; then on its own.
        crossed = [
            (
                s.topics.tenant("t").responses("chat"),
                ChatResponse(request_id=requests["acme"].request_id, tenant_id="t", answer="t's"),
            ),
            (
                s.topics.tenant("acme").responses("chat"),
                ChatResponse(request_id=requests["t"].request_id, tenant_id="acme", answer="acme's"),
            ),
        ]
        await _produce(s, crossed)
        await asyncio.sleep(1.5)
        assert not any(call.done() for call in calls.values())
        await _produce(
            s,
            [
                (
                    s.topics.tenant(t).responses("chat"),
                    ChatResponse(request_id=r.request_id, tenant_id=t, answer=f"for {t}"),
                )
                for t, r in requests.items()
            ],
        )
        answers = {key: (await asyncio.wait_for(call, 30)).json() for key, call in calls.items()}
        assert answers["sk-acme"]["choices"][0]["message"]["content"] == "for acme"
        assert answers["sk-t"]["choices"][0]["message"]["content"] == "for t"

        # One bus client per tenant, each reading its own tenant's reply topics only.
        started = app.state.serving.clients.started
        assert set(started) == set(TENANTS)
        for tenant, client in started.items():
            own = s.topics.tenant(tenant)
            assert set(client.replies.models) == {own.responses("chat"), own.tokens}

        # A key whose tenant has no topics on the bus: a 503 that says so; the others still serve.
        ghost = await ask("sk-ghost")
        assert ghost.status_code == 503 and ghost.json()["error"]["code"] == "tenant_unavailable"
        assert "ghost" not in app.state.serving.clients.started
        assert (await http.get("/healthz")).status_code == 200
