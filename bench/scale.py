"""Does ragbus let inference workers scale out? The same enriched requests answered by one worker
process, then by two in the same consumer group, on the same machine, model and topics layout.

Each phase has its own topic prefix (4 partitions on the enriched lane) and starts its workers as
`ragbus start` does (child processes `ragbus worker run`, each with its own stable instance id).
Once every worker has joined the group and answered a warm-up request on every partition (model
loaded, partitions assigned), N requests are produced at once, spread evenly over the partitions;
the clock runs from the first send to the last committed response a read_committed reader sees.
`workers2_ratio = throughput with 2 workers ÷ throughput with 1` (completion tokens per second).

Each worker's llama.cpp engine gets `--threads` threads (default 1), so one worker cannot use the
whole machine by itself: with 2 cores, ideal scaling is 2.0 minus what the broker and the clients
take. Nothing in ragbus is shared between the workers but the broker; the figure says whether
anything serialises them. Usage:
    .venv/bin/python bench/scale.py [--quick] [--requests N] [--max-tokens T] [--threads K]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from aiokafka.errors import KafkaError

from bench.components import ComponentProcess, bench_settings
from bench.worker import TENANT, Replies, requests
from infra.kafka.clients import make_admin, make_producer
from infra.kafka.codec import encode
from infra.kafka.topics import declare_topics
from infra.settings import Settings
from schemas import EnrichedRequest
from tests.provision import KafkaService, kafka_service

log = logging.getLogger("bench.scale")

#: Partitions of the enriched lane: two workers get two each.
PARTITIONS = 4


async def produce(settings: Settings, events: list[EnrichedRequest]) -> None:
    """`events` onto chat.enriched, request i on partition i mod PARTITIONS (an even spread)."""
    producer = make_producer(settings, linger_ms=0)
    await producer.start()
    try:
        for i, ev in enumerate(events):
            enc = encode(ev)
            await producer.send(
                settings.topics.enriched("chat"),
                enc.value,
                key=enc.key,
                headers=enc.headers,
                partition=i % PARTITIONS,
            )
        await producer.flush()
    finally:
        await producer.stop()


async def members(settings: Settings) -> int:
    """How many members of the worker group hold partitions."""
    admin = make_admin(settings)
    await admin.start()
    try:
        (group,) = await admin.describe_consumer_groups([f"{settings.topic_prefix}.worker"])
    except KafkaError:  # no coordinator yet: the group is being created
        return 0
    finally:
        await admin.close()
    return sum(1 for m in group.groups[0][5] if m[4]) if group.groups else 0


async def phase(
    kafka: KafkaService, workers: int, n: int, max_tokens: int, threads: int, work: Path
) -> float:
    """Completion tokens per second with `workers` worker processes."""
    settings = bench_settings(kafka.bootstrap, work / f"w{workers}", client=kafka.client).model_copy(
        update={"kafka_partitions": PARTITIONS}
    )
    await declare_topics(settings, tenants=[TENANT])
    model = {
        "name": "bench",
        "backend": "llamacpp",
        "model": "packaged:smollm2",
        "options": {"n_threads": threads},
    }
    env = {
        "RAGBUS_LLM_MODELS": json.dumps([model]),
        "RAGBUS_LLM_CONTEXT_WINDOW": "2048",
        "RAGBUS_RESPONSE_CACHE_SIZE": "0",
    }
    (work / f"w{workers}").mkdir(parents=True, exist_ok=True)
    procs = [
        ComponentProcess(
            settings,
            ["worker", "run"],
            work / f"w{workers}" / f"worker-{slot}.log",
            env={**env, "RAGBUS_INSTANCE_ID": f"{settings.instance_id}-worker-{slot}"},
        )
        for slot in range(workers)
    ]
    replies = Replies(settings)
    await replies.start()
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 300
        while await members(settings) < workers:
            if time.monotonic() > deadline or not all(p.alive() for p in procs):
                raise RuntimeError(f"the workers did not all join; see the logs under {work}")
            await asyncio.sleep(0.5)
        warm = requests(PARTITIONS, 4)
        await produce(settings, warm)
        await replies.wait({e.request_id for e in warm}, timeout=300)
        if await members(settings) < workers:
            raise RuntimeError("a worker left the group during the warm-up")

        events = requests(n, max_tokens)
        t0 = time.perf_counter()
        await produce(settings, events)
        await replies.wait({e.request_id for e in events})
        elapsed = max(replies.seen[e.request_id][0] for e in events) - t0
        tokens = sum(replies.seen[e.request_id][1].usage.completion_tokens for e in events)
    finally:
        await replies.stop()
        for p in procs:
            p.stop()
    tok_s = tokens / elapsed
    print(f"{workers} worker(s): {tokens} tokens in {elapsed:.2f} s = {tok_s:.1f} tok/s", flush=True)
    return tok_s


async def main(args: argparse.Namespace) -> None:
    n, max_tokens = (16, 16) if args.quick else (args.requests, args.max_tokens)
    cache = Path(os.environ.get("RAGBUS_TEST_CACHE", Path.home() / ".cache" / "ragbus"))
    work = Path(tempfile.mkdtemp(prefix="ragbus-bench-scale-"))
    base = Settings(_env_file=None)  # type: ignore[call-arg]
    print(
        f"requests={n} max_tokens={max_tokens} threads_per_worker={args.threads} cores={os.cpu_count()} "
        f"load={os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with kafka_service(work / "kafka", cache=cache, version=base.kafka_version) as kafka:
        one = await phase(kafka, 1, n, max_tokens, args.threads, work)
        two = await phase(kafka, 2, n, max_tokens, args.threads, work)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(
        f"RESULT workers2_ratio={two / one:.3f} workers1_tok_s={one:.1f} workers2_tok_s={two:.1f} "
        f"threads_per_worker={args.threads}"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 requests of 16 tokens per phase")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads per worker")
    logging.basicConfig(level=logging.WARNING)
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the throwaway broker is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    asyncio.run(main(p.parse_args()))
