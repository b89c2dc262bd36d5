"""The audit sink against the real broker and Postgres: every readable record on every topic of
the prefix (DLQs and topics created later included) becomes exactly one row; replays insert
nothing; encrypted payloads hold no plaintext and `ragbus audit` decrypts them."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sys
from typing import Any

import asyncpg
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from infra.kafka.clients import make_admin, make_consumer, make_producer, transactional_id
from infra.kafka.codec import DecodeError, Output, decode_record, encode
from infra.kafka.dlq import encode_dead_letter, rejection_response
from infra.kafka.inspect import cluster_view
from infra.kafka.publisher import TransactionalPublisher
from infra.settings import Settings
from infra.smoke import round_trip
from schemas import ChatRequest, ChatResponse, DeadLetter, Usage
from sinks.audit.crypto import generate_key
from sinks.audit.sink import AuditSink
from tests.helpers import env_for, read_events, wait_for
from tests.integration.audit_support import audit_coords, mixed_event, readable_records, row_count, send


async def _echo_with_garbage(settings: Settings) -> None:
    """Answers and dead letters published by the components' transactional publisher: answers in
    Kafka transactions with the consumed offsets, garbage to the DLQ."""
    acme = settings.topics.tenant("acme")
    requests, responses = acme.requests("chat"), acme.responses("chat")
    producer = make_producer(settings)
    await producer.start()
    try:
        for n in range(3):
            await send(
                producer,
                requests,
                encode(ChatRequest(question=f"q{n}", tenant_id="acme", request_id=f"e{n}")),
            )
        for garbage in (
            b"not json {",
            b"\xff\xfe",
            b'{"request_id": "e-bad", "tenant_id": "acme", "question": ""}',
        ):
            await producer.send_and_wait(requests, garbage)
    finally:
        await producer.stop()

    group = f"{settings.topic_prefix}.echo"
    publisher = TransactionalPublisher(
        settings, group_id=group, transactional_id=transactional_id(settings, "echo"), client_id="echo"
    )
    consumer = make_consumer(settings, requests, group_id=group)
    await publisher.start()
    await consumer.start()
    pairs: list[tuple[Any, list[Output]]] = []
    try:
        while len(pairs) < 6:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    try:
                        event = decode_record(record, ChatRequest, max_bytes=1 << 20)
                    except DecodeError as err:
                        out = [encode_dead_letter(record, err, stage=group)]
                        reply = rejection_response(record, err, topics=settings.topics)
                        pairs.append((record, out + ([reply] if reply else [])))
                        continue
                    answer = ChatResponse(answer="ok", **event.envelope())  # type: ignore[arg-type]
                    pairs.append((record, [(responses, encode(answer))]))
        await publisher.submit(pairs)
    finally:
        await consumer.stop()
        await publisher.stop()

    # Commit markers reach the partitions after the commit returns: poll until they are readable.
    async def answered() -> bool:
        got = {r.request_id for r in await read_events(settings, responses, ChatResponse, timeout=3)}
        letters = await read_events(settings, settings.topics.dlq(requests), DeadLetter, timeout=3)
        return {"e0", "e1", "e2", "e-bad"} <= got and len([d for d in letters if d.stage == group]) == 3

    await wait_for(answered, timeout=30, what="the echo's answers and dead letters")


async def _own_events(settings: Settings, n: int) -> None:
    """Plain events (garbage among them), one committed and one aborted Kafka transaction."""
    rng = random.Random(11)
    producer = make_producer(settings)
    tx = make_producer(settings, transactional_id=transactional_id(settings, "audit-test"))
    await producer.start()
    await tx.start()
    try:
        for i in range(n):
            await send(producer, *mixed_event(settings, rng, i))
        await producer.flush()
        for commit in (True, False):
            await tx.begin_transaction()
            for i in range(5):
                await send(tx, *mixed_event(settings, rng, 10_000 + i))
            if commit:
                await tx.commit_transaction()
            else:
                await tx.abort_transaction()
    finally:
        await producer.stop()
        await tx.stop()


async def _late_topic(settings: Settings) -> str:
    """A topic created while the sink runs, carrying an event type outside the declared ones."""
    name = f"{settings.topic_prefix}.models.updates"
    admin = make_admin(settings)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = make_producer(settings)
    await producer.start()
    try:
        for _ in range(50):
            try:
                await producer.send_and_wait(
                    name,
                    b'{"model": "smol-2", "tenant_id": "ops"}',
                    headers=[("ragbus-event-type", b"model.update")],
                )
                break
            except KafkaError:
                await asyncio.sleep(0.2)
    finally:
        await producer.stop()
    return name


async def test_every_record_on_every_topic_becomes_exactly_one_row(settings: Settings) -> None:
    dsn = settings.postgres_dsn
    sink = AuditSink(settings, batch_size=100, metadata_max_age_ms=1000)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    try:
        assert all(r.ok for r in await round_trip(settings))  # one event on every declared topic
        await _echo_with_garbage(settings)
        await _own_events(settings, 400)
        late = await _late_topic(settings)
        expected, end_offsets = await readable_records(settings)

        async def stored() -> bool:
            return await row_count(dsn) >= len(expected)

        await wait_for(stored, what="a row for every record")

        async def no_lag() -> Any:
            view = await cluster_view(settings)
            group = next((g for g in view.groups if g.group_id == f"{settings.topic_prefix}.audit"), None)
            return group is not None and late in group.lag and group.total_lag == 0

        # What `ragbus status` shows: the sink's group, caught up on every topic, markers included.
        await wait_for(no_lag, what="the audit group's lag to reach 0")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)

    coords, dups = await audit_coords(dsn)
    assert dups == 0 and len(coords) == len(set(coords))
    assert set(coords) == expected  # nothing lost, and nothing that was not committed (aborted)
    # Transaction markers and the aborted transaction occupy offsets that hold no readable record.
    assert end_offsets > len(expected)

    conn = await asyncpg.connect(dsn)
    try:
        actions = dict(await conn.fetch("SELECT action_type, count(*) FROM audit_log GROUP BY 1"))
        dlq_rows = await conn.fetchval("SELECT count(*) FROM audit_log WHERE topic LIKE '%.dlq'")
        raw = await conn.fetchval("SELECT count(*) FROM audit_log WHERE request_payload ? 'raw_b64'")
        model_update = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE action_type = 'MODEL_UPDATE'"
        )
        tokens = await conn.fetchval(
            "SELECT sum(prompt_tokens) FROM audit_log "
            "WHERE event_type = 'chat.response' AND tenant_id = 'acme'"
        )
    finally:
        await conn.close()
    assert {"QUERY", "RETRIEVAL", "RESPONSE", "TOKEN", "INGEST", "ERROR"} <= set(actions)
    assert dlq_rows >= 3 + 3  # the smoke's dead letters and the echo stage's
    assert raw > 0 and model_update == 1 and tokens > 0

    # A replay of everything (a fresh group re-reads the topics) stores nothing twice.
    replay = AuditSink(settings, batch_size=500, metadata_max_age_ms=1000)
    replay.group_id = f"{settings.topic_prefix}.audit-replay"
    stop = asyncio.Event()
    task = asyncio.create_task(replay.run(stop))
    try:
        await wait_for(lambda: _replayed(replay, len(expected)), what="the replay")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    assert replay.stats.inserted == 0 and replay.stats.duplicates == replay.stats.records
    assert (await audit_coords(dsn))[0].__len__() == len(expected)


async def _replayed(sink: AuditSink, n: int) -> bool:
    return sink.stats.duplicates >= n


SECRET = "the vault code is pineapple-42"


async def _produce_secrets(settings: Settings, request_id: str, *, with_garbage: bool) -> int:
    t = settings.topics.tenant("acme")
    env = {"tenant_id": "acme", "user_id": "alice", "request_id": request_id}
    req = ChatRequest(question=f"{SECRET} ({request_id})", client_ip="203.0.113.9", **env)
    items: list[tuple[str, Any]] = [
        (t.requests("chat"), encode(req)),
        (
            t.responses("chat"),
            encode(ChatResponse(answer=SECRET, usage=Usage(prompt_tokens=11, completion_tokens=4), **env)),
        ),
    ]
    if with_garbage:
        items.append((t.requests("chat"), f"garbage {SECRET}".encode()))
        letter = DeadLetter(
            source_topic=t.requests("chat"),
            source_partition=0,
            source_offset=0,
            original_value=f"bad {SECRET}".encode(),
            error_class="schema_validation",
            error_message="question: too long",
            stage="test",
            **env,
        )
        items.append((settings.topics.dlq(t.requests("chat")), encode(letter)))
    producer = make_producer(settings)
    await producer.start()
    try:
        for topic, item in items:
            await (await send(producer, topic, item))
    finally:
        await producer.stop()
    return len(items)


async def _sink_until(settings: Settings, rows: int) -> None:
    sink = AuditSink(settings, metadata_max_age_ms=1000)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    try:
        await wait_for(lambda: _at_least(settings.postgres_dsn, rows), what=f"{rows} audit rows")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def _at_least(dsn: str, n: int) -> bool:
    return await row_count(dsn) >= n


async def _cli(settings: Settings, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *args,
        env=env_for(settings, COLUMNS="200"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_encrypted_at_rest_rotated_and_decrypted_by_ragbus_audit(settings: Settings) -> None:
    k1, k2 = generate_key("k1"), generate_key("k2")
    first = settings.model_copy(update={"audit_encryption_keys": SecretStr(k1)})
    n = await _produce_secrets(first, "r-enc-1", with_garbage=True)
    await _sink_until(first, n)
    rotated = settings.model_copy(update={"audit_encryption_keys": SecretStr(f"{k2},{k1}")})
    n += await _produce_secrets(rotated, "r-enc-2", with_garbage=False)
    await _sink_until(rotated, n)

    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        stored = await conn.fetch(
            "SELECT key_id, request_payload::text AS p, host(ip_address) AS ip FROM audit_log"
        )
    finally:
        await conn.close()
    assert len(stored) == n
    b64 = [base64.b64encode(f"{w} {SECRET}".encode()).decode() for w in ("garbage", "bad")]
    for row in stored:
        assert "pineapple" not in row["p"] and not any(b in row["p"] for b in b64), row["p"]
    assert sorted(r["key_id"] for r in stored) == ["k1"] * 4 + ["k2"] * 2
    assert {r["ip"] for r in stored} == {"203.0.113.9", None}

    # `ragbus audit` with the rotated key list decrypts old and new rows alike.
    code, out, err = await _cli(rotated, "audit", "--user", "alice", "--action", "QUERY", "--json")
    assert code == 0, err
    questions = sorted(e["payload"]["question"] for e in json.loads(out))
    assert questions == [f"{SECRET} (r-enc-1)", f"{SECRET} (r-enc-2)"]
    code, out, err = await _cli(rotated, "audit", "--request-id", "r-enc-1")
    assert code == 0 and "pineapple" in out and "RESPONSE" in out, err
    code, out, err = await _cli(rotated, "audit", "--action", "ERROR", "--json")
    letters = [e for e in json.loads(out) if e["event_type"] == "dead_letter"]
    assert base64.b64decode(letters[0]["payload"]["original_value"]) == f"bad {SECRET}".encode()

    # Without the old key its rows stay sealed, and the command says so instead of failing.
    only_new = settings.model_copy(update={"audit_encryption_keys": SecretStr(k2)})
    code, out, err = await _cli(only_new, "audit", "--action", "QUERY")
    assert code == 0 and "[encrypted]" in out and "pineapple" in out
    assert "stay encrypted" in err and "'k1'" in err
    code, out, err = await _cli(only_new, "audit", "--action", "QUERY", "--json")
    by_request = {e["request_id"]: e for e in json.loads(out)}
    assert by_request["r-enc-2"]["payload"]["question"] == f"{SECRET} (r-enc-2)"
    assert by_request["r-enc-2"]["sealed"] == []
    assert "$enc" in by_request["r-enc-1"]["payload"]["question"] and by_request["r-enc-1"]["sealed"]

    code, out, err = await _cli(rotated, "usage", "--by", "tenant", "--since", "1d", "--json")
    assert code == 0, err
    assert json.loads(out) == [
        {"key": "acme", "responses": 2, "prompt_tokens": 22, "completion_tokens": 8, "total_tokens": 30}
    ]
