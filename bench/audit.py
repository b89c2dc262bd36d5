"""Audit sink throughput against the raw asyncpg COPY-staging path, in one run.

What it measures:
- `audit_events_per_s`: N events (a realistic mix — 40% streamed tokens, 25% requests, 20%
  responses, 15% enriched requests with 4 retrieved chunks; ~0.7 kB on average) are produced to the
  declared topics first; then the audit sink runs in this process with a fresh consumer group
  and the clock runs from its first fetched batch to the moment the last row's transaction has
  committed (Kafka fetch, parsing, row mapping, COPY into staging + INSERT … ON CONFLICT DO
  NOTHING, offset commits).
- `raw_rows_per_s`: the same rows (mapped beforehand from the same records) written with plain
  asyncpg the same way — per batch of the same size, one transaction of `copy_records_to_table`
  into a temporary staging table and `INSERT … SELECT … ON CONFLICT DO NOTHING` — into a fresh
  `audit_log` with the same schema and indexes. This is the floor the sink builds on.
- `audit_ratio` = audit / raw.

Services come from `tests.provision` (RAGBUS_TEST_KAFKA_BOOTSTRAP / RAGBUS_TEST_PG_DSN, Docker, or
local processes). Run: `.venv/bin/python bench/audit.py [--quick] [--events N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg
from aiokafka import TopicPartition
from pydantic import SecretStr
from tqdm import tqdm

from infra.kafka.clients import make_consumer, make_producer
from infra.kafka.codec import Encoded, encode
from infra.kafka.topics import declare_topics
from infra.postgres.migrations import migrate
from infra.settings import Settings
from schemas import (
    ChatRequest,
    ChatResponse,
    EnrichedRequest,
    RetrievedChunk,
    TokenChunk,
    Usage,
)
from schemas.topics import TOPICS
from sinks.audit.rows import COLUMNS, Row, RowMapper
from sinks.audit.sink import AuditSink
from sinks.audit.writer import CREATE_STAGE, INSERT, STAGE
from tests.provision import create_database, kafka_service, postgres_service

CACHE = Path(os.environ.get("RAGBUS_TEST_CACHE", Path.home() / ".cache" / "ragbus"))
#: Python CPU microseconds per event/row in each path (the rest of the wall time is Postgres,
#: the broker, and waiting for a CPU).
CPU_US: dict[str, float] = {}
SINK: dict[str, str] = {}
PASSAGE = (
    "Employees accrue 2.08 days of paid leave per month of service; unused leave carries over "
    "into the next calendar year up to a maximum of ten days, after which it lapses. "
)


def make_event(settings: Settings, i: int) -> tuple[str, Encoded]:
    t = settings.topics
    env = {"tenant_id": f"tenant{i % 20}", "user_id": f"user{i % 500}", "request_id": f"req-{i // 4}"}
    k = i % 20
    if k < 8:
        return t.tokens, encode(TokenChunk(index=i % 64, text=" leave", model="smollm2", **env))
    if k < 13:
        question = f"How many days of paid leave do I get after {i % 36} months? ({i})"
        return t.requests("chat"), encode(ChatRequest(question=question, client_ip="10.1.2.3", **env))
    if k < 17:
        usage = Usage(prompt_tokens=180 + i % 50, completion_tokens=20 + i % 30, total_tokens=200 + i % 80)
        answer = "You accrue 2.08 days per month, so about 25 days a year [1]."
        return t.responses("chat"), encode(
            ChatResponse(answer=answer, model="smollm2", usage=usage, finish_reason="stop", **env)
        )
    req = ChatRequest(question=f"What is the leave policy? ({i})", **env)
    chunks = [
        RetrievedChunk(chunk_id=f"c{j}", doc_id="handbook", text=PASSAGE, score=0.8 - j / 10)
        for j in range(4)
    ]
    return t.enriched("chat"), encode(EnrichedRequest(request=req, chunks=chunks, **env))


async def produce(settings: Settings, n: int) -> int:
    producer = make_producer(settings, linger_ms=20)
    await producer.start()
    size = 0
    try:
        pending = []
        for i in tqdm(range(n), desc="producing", unit="ev", mininterval=1.0):
            topic, enc = make_event(settings, i)
            size += len(enc.value)
            pending.append(await producer.send(topic, enc.value, key=enc.key, headers=enc.headers))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return size


async def read_all(settings: Settings, n: int) -> list[Any]:
    """The produced records, read back (for the raw path's rows)."""
    consumer = make_consumer(settings, group_id=None, fetch_max_wait_ms=50)
    await consumer.start()
    out: list[Any] = []
    try:
        tps = [
            TopicPartition(spec.name(settings.topic_prefix), p)
            for spec in TOPICS
            for p in range(spec.partitions)
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        with tqdm(total=n, desc="reading back", unit="ev", mininterval=1.0) as bar:
            while len(out) < n:
                got = await consumer.getmany(timeout_ms=500, max_records=10_000)
                for recs in got.values():
                    out.extend(recs)
                    bar.update(len(recs))
    finally:
        await consumer.stop()
    return out


async def raw_copy(dsn: str, rows: list[Row], batch: int) -> float:
    """Plain asyncpg: per batch, COPY into staging + INSERT … ON CONFLICT DO NOTHING. Rows/s."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(CREATE_STAGE)
        cpu = time.process_time()
        started = time.perf_counter()
        for i in tqdm(range(0, len(rows), batch), desc="raw asyncpg", unit="batch", mininterval=1.0):
            async with conn.transaction():
                await conn.copy_records_to_table(STAGE, records=rows[i : i + batch], columns=COLUMNS)
                await conn.execute(INSERT)
        elapsed = time.perf_counter() - started
        CPU_US["raw"] = (time.process_time() - cpu) / len(rows) * 1e6
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == len(rows)
    finally:
        await conn.close()
    return len(rows) / elapsed


async def through_sink(settings: Settings, n: int) -> float:
    """The audit sink from its first fetched batch until every row is committed. Events/s."""
    sink = AuditSink(settings, log_every_s=3600)
    await sink.start()
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    first = None
    try:
        with tqdm(total=n, desc="audit sink", unit="ev", mininterval=1.0) as bar:
            while sink.stats.inserted < n:
                if task.done():
                    task.result()
                if first is None and sink.stats.records:
                    first, cpu = time.perf_counter(), time.process_time()
                bar.update(sink.stats.inserted - bar.n)
                await asyncio.sleep(0.002)
            done = time.perf_counter()
            CPU_US["audit"] = (time.process_time() - cpu) / n * 1e6
            bar.update(sink.stats.inserted - bar.n)
    finally:
        stop.set()
        await task
    assert first is not None and sink.stats.duplicates == 0
    st = sink.stats
    SINK["detail"] = (
        f"{st.batches} batches; writer in Postgres {st.write_s:.1f} s, committing offsets "
        f"{st.commit_s:.1f} s, of {done - first:.1f} s"
    )
    return n / (done - first)


async def quiesce(admin_dsn: str, *, drop: str | None = None) -> None:
    """Equal footing for the next phase: the previous phase's database is dropped (so autovacuum
    does not work on it meanwhile) and a checkpoint flushes its WAL first."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        if drop:
            await conn.execute(f'DROP DATABASE "{drop}"')
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def database(postgres: Any, name: str) -> str:
    await create_database(postgres.dsn, name)
    dsn = postgres.dsn_for(name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return dsn


async def main(args: argparse.Namespace) -> None:
    n = args.events or (50_000 if args.quick else 200_000)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ragbus-bench-audit-") as tmp:
        root = Path(tmp)
        with (
            kafka_service(root / "kafka", cache=CACHE, version=Settings().kafka_version) as kafka,
            postgres_service(root / "pg") as postgres,
        ):
            prefix = f"bench{uuid.uuid4().hex[:8]}"
            sink_dsn = await database(postgres, f"{prefix}_sink")
            raw_dsn = await database(postgres, f"{prefix}_raw")
            settings = Settings(
                kafka_bootstrap=kafka.bootstrap,
                **kafka.client,
                topic_prefix=prefix,
                pg_dsn=SecretStr(sink_dsn),
                home=root / "home",
                _env_file=None,  # type: ignore[call-arg]
            )
            await declare_topics(settings)
            size = await produce(settings, n)
            records = await read_all(settings, n)
            rows = RowMapper(prefix).rows(records)
            del records
            await quiesce(postgres.dsn)
            raw = await raw_copy(raw_dsn, rows, settings.audit_batch_size)
            del rows
            await quiesce(postgres.dsn, drop=f"{prefix}_raw")
            audit = await through_sink(settings, n)
    load_after = os.getloadavg()
    print(
        f"{n} events, {size / n:.0f} B average, batch {settings.audit_batch_size}; services: "
        f"kafka={kafka.kind} postgres={postgres.kind}; {os.cpu_count()} CPUs, load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(
        f"audit sink {audit:,.0f} events/s ({CPU_US['audit']:.1f} µs Python CPU per event); "
        f"raw asyncpg COPY-staging {raw:,.0f} rows/s ({CPU_US['raw']:.1f} µs per row)"
    )
    print(f"audit sink: {SINK['detail']}")
    print(f"RESULT audit_events_per_s={audit:.0f} raw_rows_per_s={raw:.0f} audit_ratio={audit / raw:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50,000 events instead of 200,000.")
    parser.add_argument("--events", type=int, default=0, help="Number of events (overrides --quick).")
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parser.parse_args()))
