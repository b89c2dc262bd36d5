"""What one Kafka hop costs on this machine, piece by piece, so the bus latency of `bench/e2e.py`
can be split into its parts instead of guessed at.

Against a throwaway local broker, one record at a time (no load, so no queueing):
- `plain`: an idempotent producer's send (as the clients send requests) until a read_committed
  consumer of the same process has it;
- `txn`: a transactional producer's send + send_offsets_to_transaction + commit (as the
  publisher commits a batch): how long the commit takes, and how long until the read_committed
  consumer sees the record (it sees it only after the commit markers);
- each for the producer's linger_ms as configured (`--linger`, default the settings' value) and 0.

Usage:
    .venv/bin/python bench/hops.py [--quick] [--n 200] [--linger 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import TopicPartition

from bench.components import bench_settings
from infra.kafka.clients import make_consumer, make_producer
from infra.kafka.topics import declare_topics
from infra.settings import Settings
from tests.provision import kafka_service

CACHE = Path(os.environ.get("RAGBUS_TEST_CACHE", Path.home() / ".cache" / "ragbus"))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def line(name: str, values: list[float]) -> str:
    return (
        f"{name:<40}{pct(values, 50):>8.2f}{pct(values, 90):>8.2f}{pct(values, 99):>8.2f}"
        f"{statistics.fmean(values):>8.2f}"
    )


async def seen(consumer: object, key: bytes) -> float:
    """Poll until the record keyed `key` arrives; the time it did."""
    while True:
        batches = await consumer.getmany(timeout_ms=1000)  # type: ignore[attr-defined]
        for records in batches.values():
            if any(r.key == key for r in records):
                return time.perf_counter()


async def measure(s: Settings, n: int, linger: int, backoff: int) -> list[str]:
    topic = s.topics.enriched("chat")
    source = TopicPartition(s.topics.enriched("bulk"), 0)
    consumer = make_consumer(s, topic, group_id=None, client_id="hops")
    plain = make_producer(s, client_id="hops-plain", linger_ms=linger)
    txn = make_producer(
        s,
        client_id="hops-txn",
        transactional_id=f"hops-{uuid.uuid4().hex}",
        linger_ms=linger,
        retry_backoff_ms=backoff,
    )
    for c in (consumer, plain, txn):
        await c.start()
    await consumer.seek_to_end()
    hop, commit, txn_hop = [], [], []
    phases: tuple[list[float], list[float], list[float]] = ([], [], [])
    try:
        for i in range(n + 5):
            key = uuid.uuid4().hex.encode()
            t0 = time.perf_counter()
            waiter = asyncio.create_task(seen(consumer, key))
            await plain.send(topic, b"x" * 200, key=key)
            t1 = await waiter
            key = uuid.uuid4().hex.encode()
            waiter = asyncio.create_task(seen(consumer, key))
            t2 = time.perf_counter()
            async with txn.transaction():
                await (await txn.send(topic, b"x" * 200, key=key))
                ta = time.perf_counter()
                await txn.send_offsets_to_transaction({source: i + 1}, "hops-group")
                tb = time.perf_counter()
            t3 = time.perf_counter()
            t4 = await waiter
            if i >= 5:  # warm-up
                hop.append((t1 - t0) * 1000)
                commit.append((t3 - t2) * 1000)
                phases[0].append((ta - t2) * 1000)
                phases[1].append((tb - ta) * 1000)
                phases[2].append((t3 - tb) * 1000)
                txn_hop.append((t4 - t2) * 1000)
    finally:
        for c in (consumer, plain, txn):
            await c.stop()
    return [
        line(f"plain send → seen (linger {linger})", hop),
        line(f"txn commit (linger {linger}, backoff {backoff})", commit),
        line(f"txn begin → seen (linger {linger}, backoff {backoff})", txn_hop),
        line("  add partitions + produce", phases[0]),
        line("  add offsets + offset commit", phases[1]),
        line("  end transaction", phases[2]),
    ]


async def run(args: argparse.Namespace) -> None:
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    with tempfile.TemporaryDirectory(prefix="ragbus-bench-hops-") as tmp:
        work = Path(tmp)
        with kafka_service(work / "kafka", cache=CACHE, version=defaults.kafka_version) as kafka:
            s = bench_settings(kafka.bootstrap, work, kafka.client)  # authenticated, like `ragbus up`
            await declare_topics(s)
            rows = []
            for linger in dict.fromkeys([args.linger, 0]):
                for backoff in dict.fromkeys(args.backoff):
                    rows += await measure(s, args.n, linger, backoff)
    print(f"{'ms':<40}{'p50':>8}{'p90':>8}{'p99':>8}{'mean':>8}")
    for row in rows:
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 records per measurement")
    parser.add_argument("--n", type=int, help="records per measurement (default 200; --quick 50)")
    parser.add_argument("--linger", type=int, default=Settings(_env_file=None).kafka_linger_ms)  # type: ignore[call-arg]
    parser.add_argument(
        "--backoff", type=int, nargs="+", default=[20], help="transactional retry_backoff_ms values to try"
    )
    args = parser.parse_args()
    args.n = args.n or (50 if args.quick else 200)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
