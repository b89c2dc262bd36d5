"""End to end through the real stack: processors, inference worker (SmolLM2 on llama.cpp), audit sink
and gateway run as the `ragbus` processes a user starts, against the session's broker and Postgres.

One pipeline serves the whole module (models load once); the tests then come in through each way
in: the official `openai` package against the gateway, `kcat` on the topics, and a bulk job that is
interrupted and resumed. The trace and audit checks look at what those runs left behind.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infra.kafka.security import client_properties, ensure_tenant, rotate_tenant
from infra.settings import Settings
from producers.bulk.runner import request_id_for
from schemas import ChatResponse
from tests.helpers import read_events, read_topic, run_ragbus, spawn, wait_for
from tests.integration.audit_support import audit_coords, readable_records
from tests.integration.pipeline_support import (
    Pipeline,
    running_with_gateway,
)
from tests.provision import KafkaService, PostgresService

SAMPLES = Path(__file__).resolve().parents[2] / "producers" / "samples"
KEY = "sk-e2e-" + uuid.uuid4().hex
TENANT = "northwind"


async def rotate_or_add(settings: Settings, tenant: str):  # type: ignore[no-untyped-def]
    """The tenant's credentials, as `ragbus tenants add` (or `rotate`, when it exists) prints them."""
    return await ensure_tenant(settings, tenant, declare=False) or await rotate_tenant(settings, tenant)


#: A second tenant, with a gateway key of its own and no documents.
RIVAL, RIVAL_KEY = "rival", "sk-e2e-rival-" + uuid.uuid4().hex
#: A tenant with no documents for the bulk job (short prompts).
NODOCS = "nodocs"


@dataclass
class E2E:
    """The module's pipeline (sink, worker, processors, gateway) and where the gateway listens."""

    pipeline: Pipeline
    gateway_url: str
    spans: Path

    @property
    def settings(self) -> Settings:
        return self.pipeline.settings

    def log_tail(self) -> str:
        return self.pipeline.log_tail()


@pytest.fixture(scope="module")
async def pipeline(
    kafka: KafkaService, postgres: PostgresService, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[E2E]:
    root = tmp_path_factory.mktemp("e2e")
    async with running_with_gateway(
        kafka,
        postgres,
        root,
        keys=[(KEY, TENANT, "alice"), (RIVAL_KEY, RIVAL, "mallory")],
        components=("sink", "worker", "processors", "gateway"),
        tenants=(TENANT, RIVAL, NODOCS),
        otel_exporter="file",
        otel_file=root / "spans.jsonl",
    ) as (url, p):
        s = p.settings
        code, out, err = await run_ragbus(s, "ingest", str(SAMPLES / "docs"), "--tenant", TENANT, "--json")
        assert code == 0, f"{out}\n{err}\n{p.log_tail()}"
        assert json.loads(out)["indexed"] == 3
        yield E2E(p, url, root / "spans.jsonl")


def _openai(p: E2E, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{p.gateway_url}/v1", api_key=key, timeout=240, max_retries=0)


#: Questions on the sample documents that SmolLM2-135M (Q4, greedy) answers right with the
#: worker's prompt, and what the answer contains. (It gets others wrong: a 135M model is a
#: smoke-test model; see the README for real models.)
HELPDESK = ("What is the phone extension of the IT helpdesk?", "4417")
MEALS = ("What is the daily meal allowance on business trips?", "45")


async def test_openai_package_plain_async_and_streaming(pipeline: E2E) -> None:
    messages: Any = [{"role": "user", "content": HELPDESK[0]}]

    # Plain, with the synchronous client (in a thread: it blocks).
    plain = await asyncio.to_thread(
        _openai(pipeline).chat.completions.create, model="ragbus", messages=messages, max_tokens=32
    )
    assert HELPDESK[1] in (plain.choices[0].message.content or ""), plain
    assert plain.usage is not None and plain.usage.prompt_tokens > 50 and plain.usage.completion_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    # The async client, several questions at once.
    client = openai.AsyncOpenAI(base_url=f"{pipeline.gateway_url}/v1", api_key=KEY, timeout=240)
    questions = dict([MEALS, ("How much is the meal allowance per day when travelling?", "45")])
    replies = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="ragbus", messages=[{"role": "user", "content": q}], max_tokens=32
            )
            for q in questions
        )
    )
    for (question, expected), reply in zip(questions.items(), replies, strict=True):
        assert expected in (reply.choices[0].message.content or ""), (question, reply)
        assert reply.usage is not None and reply.usage.completion_tokens > 0

    # Streaming: content arrives in several chunks, usage in the last one when asked for. (Another
    # max_tokens than above, or the worker's response cache answers at once, in one piece.)
    stream = await client.chat.completions.create(
        model="ragbus",
        messages=[{"role": "user", "content": HELPDESK[0]}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) > 1 and HELPDESK[1] in "".join(pieces), pieces
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    models = await client.models.list()
    assert models.data and all(m.id for m in models.data)
    await client.close()

    # A wrong key is refused before anything reaches the bus.
    with pytest.raises(openai.AuthenticationError):
        await asyncio.to_thread(
            _openai(pipeline, "sk-wrong").chat.completions.create, model="ragbus", messages=messages
        )


async def test_a_plain_kafka_client_with_the_printed_credentials_round_trip(pipeline: E2E) -> None:
    """What the README shows other systems doing: `ragbus tenants add` prints a tenant's client
    properties; a plain Kafka client using exactly those (and raw JSON, no ragbus code) puts a
    request on the tenant's topic and reads the answer from its reply topic. (Debian's kcat, the
    README's example, links librdkafka 2.0.2, which cannot log in with SCRAM to Kafka 4.)"""
    s = pipeline.settings
    creds = await rotate_or_add(s, TENANT)
    props = client_properties(s, creds)
    jaas = dict(re.findall(r'(\w+)="([^"]*)"', props["sasl.jaas.config"]))
    client = {
        "bootstrap_servers": props["bootstrap.servers"],
        "security_protocol": props["security.protocol"],
        "sasl_mechanism": props["sasl.mechanism"],
        "sasl_plain_username": jaas["username"],
        "sasl_plain_password": jaas["password"],
    }
    request_id = f"plain-{uuid.uuid4().hex[:8]}"
    request = {
        "request_id": request_id,
        "tenant_id": TENANT,
        "user_id": "erp",
        "question": MEALS[0],
        "sampling": {"max_tokens": 20},  # not a cache hit of the earlier test's answer
    }
    own = s.topics.tenant(TENANT)
    async with AIOKafkaProducer(**client, acks="all") as producer:
        await producer.send_and_wait(
            own.requests("chat"), json.dumps(request).encode(), key=request_id.encode()
        )
    consumer = AIOKafkaConsumer(
        own.responses("chat"), **client, isolation_level="read_committed", auto_offset_reset="earliest"
    )
    await consumer.start()

    async def answered() -> dict[str, Any] | None:
        batch = await consumer.getmany(timeout_ms=1000)
        for records in batch.values():
            for record in records:
                body = json.loads(record.value)
                if body.get("request_id") == request_id:
                    return body
        return None

    try:
        response = await wait_for(answered, timeout=180, interval=0.1, what="the plain client's answer")
    finally:
        await consumer.stop()
    assert response["error"] is None, response
    assert MEALS[1] in response["answer"], response
    assert response["citations"] and response["usage"]["completion_tokens"] > 0
    assert response["timings"]["embed_ms"] is not None and response["timings"]["generate_ms"] > 0


async def test_bulk_job_interrupted_and_resumed_answers_each_line_once(pipeline: E2E, tmp_path: Path) -> None:
    s = pipeline.settings
    n = 200
    questions = tmp_path / "questions.jsonl"
    with questions.open("w") as f:
        for i in range(n):
            body = {"model": "ragbus", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}]}
            body["max_tokens"] = 4
            line = {"custom_id": f"q-{i:03d}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            f.write(json.dumps(line) + "\n")
    out = tmp_path / "answers.jsonl"
    job = f"e2e-{uuid.uuid4().hex[:6]}"
    # A tenant with no documents: short prompts, so 200 answers take seconds, not minutes.
    args = ["bulk", "submit", str(questions), "--out", str(out), "--tenant", NODOCS, "--job", job]
    args += ["--window", "32", "--no-progress"]
    log = tmp_path / "bulk.log"
    first = spawn(args, s, log)
    try:

        async def halfway() -> bool:
            assert first.poll() is None, log.read_text()
            return out.exists() and len(out.read_text().splitlines()) >= n // 4

        # A quarter: the interrupt must land while lines are still unsent (at half, a fast machine
        # had sent them all, and the job ended complete before the SIGINT was handled).
        await wait_for(halfway, timeout=300, interval=0.2, what="a quarter of the bulk job")
        first.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(first.wait, 60)
    finally:
        if first.poll() is None:
            first.kill()
    assert code == 130, log.read_text()
    assert "resume with" in log.read_text()
    before = len(out.read_text().splitlines())
    assert n // 4 <= before < n

    code, _, err = await run_ragbus(s, *args, timeout=400)
    assert code == 0, err
    assert f"resuming job {job}" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["custom_id"] for r in rows]
    assert len(rows) == n and len(set(ids)) == n, (len(rows), len(set(ids)))
    assert set(ids) == {f"q-{i:03d}" for i in range(n)}
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in rows)
    code, status, _ = await run_ragbus(s, "bulk", "status", job, "--tenant", NODOCS, "--json")
    assert code == 0 and json.loads(status)[0]["answered"] == n
    # Jobs are the tenant's: another tenant has no job of that name.
    code, _, err = await run_ragbus(s, "bulk", "status", job, "--tenant", RIVAL)
    assert code == 2 and f"no job {job}" in err


async def test_two_tenants_with_the_same_job_and_custom_ids_get_only_their_own_answers(
    pipeline: E2E, tmp_path: Path
) -> None:
    """The same input, --job and custom ids under two tenants: two jobs, distinct request ids, and
    each output holds answers from its own tenant's knowledge only (the rival has no documents)."""
    s = pipeline.settings
    questions = tmp_path / "questions.jsonl"
    asked = {"a": HELPDESK[0], "b": MEALS[0]}
    questions.write_text(
        "".join(
            json.dumps(
                {"custom_id": cid, "body": {"messages": [{"role": "user", "content": q}], "max_tokens": 24}}
            )
            + "\n"
            for cid, q in asked.items()
        )
    )
    job = f"same-{uuid.uuid4().hex[:6]}"
    outputs: dict[str, dict[str, Any]] = {}
    for tenant in (TENANT, RIVAL):
        out = tmp_path / f"{tenant}.jsonl"
        args = ["bulk", "submit", str(questions), "--out", str(out), "--tenant", tenant, "--job", job]
        code, _, err = await run_ragbus(s, *args, "--no-progress", timeout=300)
        assert code == 0, err
        assert "resuming" not in err  # the rival's job is not a resume of the first tenant's
        outputs[tenant] = {row["custom_id"]: row for row in map(json.loads, out.read_text().splitlines())}
    for tenant, rows in outputs.items():
        assert set(rows) == set(asked)
        for cid, row in rows.items():
            assert row["response"]["request_id"] == request_id_for(tenant, job, cid)
    ours = [row["response"]["body"]["ragbus"]["citations"] for row in outputs[TENANT].values()]
    theirs = [row["response"]["body"]["ragbus"]["citations"] for row in outputs[RIVAL].values()]
    assert all(ours) and not any(theirs), (ours, theirs)


async def test_gateway_keys_of_two_tenants_each_see_only_their_own_replies(pipeline: E2E) -> None:
    """The same question through the gateway with each tenant's key: each answer comes from the
    key's tenant's knowledge, and each reply is on that tenant's responses topic only."""
    messages: Any = [{"role": "user", "content": HELPDESK[0]}]

    def ask(key: str) -> Any:
        return _openai(pipeline, key).chat.completions.create(
            model="ragbus", messages=messages, max_tokens=30
        )

    ours, theirs = await asyncio.gather(asyncio.to_thread(ask, KEY), asyncio.to_thread(ask, RIVAL_KEY))
    assert HELPDESK[1] in (ours.choices[0].message.content or ""), ours
    assert ours.model_extra["citations"] and not theirs.model_extra["citations"], (ours, theirs)
    s = pipeline.settings
    for reply, tenant, other in ((ours, TENANT, RIVAL), (theirs, RIVAL, TENANT)):
        request_id = reply.id.removeprefix("chatcmpl-")
        on_own = await read_events(s, s.topics.tenant(tenant).responses("chat"), ChatResponse)
        on_other = await read_events(s, s.topics.tenant(other).responses("chat"), ChatResponse)
        assert [r.tenant_id for r in on_own if r.request_id == request_id] == [tenant]
        assert all(r.request_id != request_id for r in on_other)


async def test_one_trace_links_gateway_retrieval_worker_and_response(pipeline: E2E) -> None:
    reply = await asyncio.to_thread(
        _openai(pipeline).chat.completions.create,
        model="ragbus",
        messages=[{"role": "user", "content": "How long must passwords be?"}],
        max_tokens=16,
    )
    request_id = reply.id.removeprefix("chatcmpl-")

    async def spans_of_request() -> dict[str, dict[str, Any]] | None:
        found = {}
        for line in pipeline.spans.read_text().splitlines():
            span = json.loads(line)
            if span["attributes"].get("ragbus.request_id") == request_id:
                found[span["name"]] = span
        want = {"POST /v1/chat/completions", "ragbus.request", "retrieval", "inference"}
        return found if want <= set(found) else None

    spans = await wait_for(spans_of_request, timeout=30, what="the request's spans")
    gateway, client = spans["POST /v1/chat/completions"], spans["ragbus.request"]
    retrieval, inference = spans["retrieval"], spans["inference"]
    assert len({x["trace_id"] for x in spans.values()}) == 1, spans
    assert client["parent_span_id"] == gateway["span_id"]
    assert retrieval["parent_span_id"] == client["span_id"]
    assert inference["parent_span_id"] == retrieval["span_id"]
    assert gateway["service"].endswith(".gateway") and retrieval["service"].endswith(".processors")
    assert inference["service"].endswith(".worker")

    # The response record carries the worker's span as its parent context.
    records = [
        r
        for r in await read_topic(
            pipeline.settings, pipeline.settings.topics.tenant(TENANT).responses("chat")
        )
        if ChatResponse.model_validate_json(r.value).request_id == request_id
    ]
    assert len(records) == 1
    traceparent = dict(records[0].headers)["traceparent"].decode()
    _, trace_id, span_id, _ = traceparent.split("-")
    assert (trace_id, span_id) == (inference["trace_id"], inference["span_id"])


async def test_audit_rows_equal_the_records_of_the_whole_run(pipeline: E2E) -> None:
    """Last in the module: every record any test put on any topic is one audit row."""
    s = pipeline.settings
    expected, end_offsets = await readable_records(s)
    dsn = s.postgres_dsn

    async def caught_up() -> bool:
        coords, _ = await audit_coords(dsn)
        return len(coords) >= len(expected)

    await wait_for(caught_up, timeout=120, what="the audit sink to catch up")
    await asyncio.sleep(2)  # nothing more may arrive
    coords, duplicates = await audit_coords(dsn)
    assert duplicates == 0
    assert len(coords) == len(set(coords)) == len(expected)
    assert set(coords) == expected
    assert end_offsets >= len(expected) > 400
    # The gateway's requests carry the client's IP into their audit rows.
    conn = await asyncpg.connect(dsn)
    try:
        with_ip = await conn.fetch(
            "SELECT topic, request_id, host(ip_address) AS ip FROM audit_log WHERE ip_address IS NOT NULL"
        )
        gateway_requests = await conn.fetch(
            "SELECT request_id FROM audit_log "
            "WHERE topic = $1 AND request_payload->'metadata'->>'api' = 'openai'",
            s.topics.tenant(TENANT).requests("chat"),
        )
    finally:
        await conn.close()
    assert len(gateway_requests) == 6, gateway_requests
    by_request = {r["request_id"]: r["ip"] for r in with_ip}
    assert all(by_request.get(r["request_id"]) == "127.0.0.1" for r in gateway_requests), with_ip
