"""What the bus costs retrieval: the same questions through Kafka to the retrieval processor, and
straight to the libraries it uses, in one run.

- processor: `ragbus processors run` as a child process, as deployed. N ChatRequests (one tenant,
  default top_k) are produced to `chat.requests` in one transaction, so they become visible to
  the processor all at once; the clock runs from that commit to the moment the last
  EnrichedRequest is seen by a read_committed consumer of `chat.enriched` (consuming, decoding,
  micro-batching, embedding, Milvus search, encoding, Kafka transactions: the processor alone,
  not this process encoding and sending, which shared the two cores with it before). Warm-up
  requests go first.
- raw: the same questions in this process, batch by batch with the processor's batch size
  (`embedding_batch_size`): `SentenceTransformer.encode` then one `MilvusClient.search` with the
  same tenant filter, limit, ef and output fields, on the same Milvus Lite file (while the
  processors are stopped: one process per file). One untimed warm-up pass, then timed passes
  before and after the processor run; their mean is used so drift from other load cancels.
- `retrieval_ratio` = processor questions/s ÷ raw questions/s (goal ≥ 0.90), with the same
  embedding thread budget on both sides (`--threads`, default cores - 1: on one machine the
  broker and the processor's event loop need the remaining core; with every core given to the
  model, its parallel sections wait on threads the bus preempts, and the ratio measures that
  contention rather than the bus).

The corpus (synthetic policy documents for three tenants) is ingested through `docs.ingest` first.
The broker is a throwaway one (tests.provision).

Usage: .venv/bin/python bench/retrieval.py [--quick] [--questions N] [--docs D]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tqdm import tqdm

from bench.components import ComponentProcess, bench_settings
from infra.kafka.clients import make_consumer, make_producer, topic_partitions
from infra.kafka.codec import encode
from infra.kafka.topics import declare_topics
from infra.milvus import make_milvus_client
from infra.settings import Settings
from processors.embedding import limit_threads, load_model
from processors.store import OUTPUT_FIELDS, quote, release_lite
from schemas import ChatRequest, DocumentIngest
from tests.provision import kafka_service

log = logging.getLogger("bench.retrieval")

CACHE = Path(os.environ.get("RAGBUS_TEST_CACHE", Path.home() / ".cache" / "ragbus"))
TENANTS = ("bench-a", "bench-b", "bench-c")
ASKER = TENANTS[0]

SUBJECTS = [
    "invoices", "badge access", "travel bookings", "laptop repairs", "parking permits", "customer refunds",
    "holiday requests", "security incidents", "printer toner", "guest visits", "data exports",
    "contract renewals", "desk moves", "software licences", "overtime claims", "mail deliveries",
]  # fmt: skip
ATTRIBUTES = [
    "approval deadline", "responsible team", "retention period", "escalation contact", "maximum amount",
    "required form", "review cycle", "archive location",
]  # fmt: skip
REGIONS = ["north", "south", "east", "west", "central", "coastal"]
VALUES = [
    "14 days", "the finance office", "seven years", "the duty manager", "2,500 euros", "form HR-12",
    "every quarter", "building C basement", "48 hours", "the service desk", "three years", "form FIN-3",
]  # fmt: skip


def corpus(docs: int, rng: random.Random) -> list[DocumentIngest]:
    """Policy documents of ~20 facts each, spread over the tenants."""
    out = []
    for i in range(docs):
        lines = [f"# Operations manual {i}", ""]
        for j in range(20):
            subject, attribute, region = rng.choice(SUBJECTS), rng.choice(ATTRIBUTES), rng.choice(REGIONS)
            lines.append(
                f"Rule {i}.{j}: for {subject} in the {region} region, the {attribute} is "
                f"{rng.choice(VALUES)}. Exceptions need written approval from the {region} office."
            )
            if j % 5 == 4:
                lines.append("")
        out.append(
            DocumentIngest(
                tenant_id=TENANTS[i % len(TENANTS)],
                doc_id=f"manual-{i}",
                content_type="text/markdown",
                text="\n".join(lines),
            )
        )
    return out


def questions(n: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        attribute, subject, region = rng.choice(ATTRIBUTES), rng.choice(SUBJECTS), rng.choice(REGIONS)
        out.append(f"What is the {attribute} for {subject} in the {region} region?")
    return out


class Collector:
    """A read_committed consumer from the topic's current end, noting when each key arrives."""

    def __init__(self, settings: Settings, *topics: str) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.consumer = make_consumer(settings, group_id=None, fetch_max_wait_ms=200)
        self.seen: dict[bytes, float] = {}

    async def start(self) -> None:
        await self.consumer.start()
        tps = await topic_partitions(self.settings, self.consumer, self.topics)
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)

    async def until(self, keys: set[bytes], bar: tqdm | None = None) -> float:
        """Wait until a record with each key has come; returns time.perf_counter() when the last
        of them came (keys seen by earlier calls count)."""
        missing = {k for k in keys if k not in self.seen}
        if bar is not None:
            bar.update(len(keys) - len(missing))
        while missing:
            batches = await self.consumer.getmany(timeout_ms=200)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    if record.key is not None:
                        self.seen.setdefault(record.key, now)
                    if record.key in missing:
                        missing.discard(record.key)
                        if bar is not None:
                            bar.update(1)
        return max(self.seen[k] for k in keys)

    async def stop(self) -> None:
        await self.consumer.stop()


async def produce(settings: Settings, topic: str, events: list, *, at_once: bool = False) -> float:  # type: ignore[type-arg]
    """Send everything; returns time.perf_counter() at the first send, or, `at_once`, when the one
    transaction holding every event has committed: the processor (a read_committed reader) sees
    none of them before and all of them then, so its clock starts with the whole backlog in front
    of it, and this process's encoding and sending (which raw does not pay) is not timed."""
    producer = make_producer(settings, transactional_id="ragbus-bench-retrieval" if at_once else None)
    await producer.start()
    try:
        started = time.perf_counter()
        if at_once:
            await producer.begin_transaction()
        for event in events:
            enc = encode(event)
            await producer.send(topic, enc.value, key=enc.key, headers=enc.headers)
        if at_once:
            await producer.commit_transaction()
            return time.perf_counter()
        await producer.flush()
        return started
    finally:
        await producer.stop()


def raw_pass(model, client, collection: str, texts: list[str], batch: int, top_k: int, ef: int) -> float:  # type: ignore[no-untyped-def]
    """encode + search, batch by batch, as the processor does; returns questions per second."""
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        part = texts[start : start + batch]
        vectors = model.encode(part, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
        client.search(
            collection,
            data=vectors.tolist(),
            anns_field="dense",
            limit=top_k,
            filter=f"tenant_id == {quote(ASKER)}",
            output_fields=OUTPUT_FIELDS,
            search_params={"metric_type": "IP", "params": {"ef": max(ef, top_k)}},
        )
    return len(texts) / (time.perf_counter() - started)


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(42)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    limit_threads(args.threads)  # raw's budget: the processor gets the same (RAGBUS_EMBEDDING_THREADS)
    print(f"embedding threads: {args.threads or 'torch default'} (raw and processor alike)", flush=True)
    model = await asyncio.to_thread(load_model, defaults.embedding_model)
    with tempfile.TemporaryDirectory(prefix="ragbus-bench-") as tmp:
        work = Path(tmp)
        with kafka_service(work / "kafka", cache=CACHE, version=defaults.kafka_version) as kafka:
            s = bench_settings(kafka.bootstrap, work, kafka.client)
            await declare_topics(s, tenants=TENANTS)
            processor = ComponentProcess(
                s,
                ["processors", "run"],
                work / "processors.log",
                env={"RAGBUS_EMBEDDING_THREADS": str(args.threads)},
            )
            try:
                processor_qps, raw_qps = await _bench(s, processor, model, args, rng)
            finally:
                processor.stop()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"RESULT retrieval_ratio={processor_qps / raw_qps:.3f} "
        f"processor_qps={processor_qps:.1f} raw_qps={raw_qps:.1f} threads={args.threads}",
        flush=True,
    )


def raw_run(s: Settings, model, texts: list[str], *, warm_up: bool) -> float:  # type: ignore[no-untyped-def]
    """Open the collection in this process (the processors are stopped: Milvus Lite allows one
    process per file), optionally warm up on every question, then time one pass."""
    client = make_milvus_client(s)
    try:
        client.load_collection(s.milvus_collection)
        batch, top_k, ef = s.embedding_batch_size, s.retrieval_top_k, s.milvus_search_ef
        if warm_up:
            raw_pass(model, client, s.milvus_collection, texts, batch, top_k, ef)
        return raw_pass(model, client, s.milvus_collection, texts, batch, top_k, ef)
    finally:
        client.close()
        release_lite(s.milvus_target)


async def _bench(  # type: ignore[no-untyped-def]
    s: Settings, processor: ComponentProcess, model, args: argparse.Namespace, rng: random.Random
) -> tuple[float, float]:
    # 1. the corpus, through docs.ingest (the first start includes loading the model)
    docs = corpus(args.docs, rng)
    results = Collector(s, *(s.topics.tenant(t).docs_ingested for t in TENANTS))
    await results.start()
    processor.start()
    with tqdm(total=len(docs), desc="ingest", unit="doc") as bar:
        for tenant in TENANTS:  # each tenant's documents on its own topic
            await produce(s, s.topics.tenant(tenant).docs_ingest, [d for d in docs if d.tenant_id == tenant])
        # from the first result on: loading the model is not ingestion
        t0 = await results.until({docs[0].doc_id.encode()})
        t1 = await results.until({d.doc_id.encode() for d in docs}, bar)
    await results.stop()
    processor.stop()
    print(f"ingested {len(docs)} documents in {t1 - t0:.1f} s after the first one")

    texts = questions(args.questions, rng)
    raw_before = await asyncio.to_thread(raw_run, s, model, texts, warm_up=True)
    print(f"raw before: {raw_before:.1f} questions/s")

    # 2. the processor: warm-up requests first (they also tell when it is up again)
    enriched = Collector(s, s.topics.enriched("chat"))
    await enriched.start()
    processor.start()
    warm = [ChatRequest(tenant_id=ASKER, question=q) for q in questions(4 * s.embedding_batch_size, rng)]
    await produce(s, s.topics.tenant(ASKER).requests("chat"), warm)
    await enriched.until({r.request_id.encode() for r in warm})
    requests = [ChatRequest(tenant_id=ASKER, question=q) for q in texts]
    with tqdm(total=len(requests), desc="processor", unit="q") as bar:
        started = await produce(s, s.topics.tenant(ASKER).requests("chat"), requests, at_once=True)
        finished = await enriched.until({r.request_id.encode() for r in requests}, bar)
    await enriched.stop()
    processor.stop()
    processor_qps = len(requests) / (finished - started)
    print(f"processor: {processor_qps:.1f} questions/s")

    raw_after = await asyncio.to_thread(raw_run, s, model, texts, warm_up=False)
    print(f"raw after: {raw_after:.1f} questions/s")
    return processor_qps, (raw_before + raw_after) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="600 questions over a small corpus")
    parser.add_argument("--questions", type=int, help="questions to ask (default 2000; --quick 600)")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="embedding threads for raw and processor alike (default: cores - 1, the core left over "
        "runs the bus: broker, event loop; 0: torch's default, every core)",
    )
    parser.add_argument("--docs", type=int, help="documents to ingest first (default 60; --quick 12)")
    args = parser.parse_args()
    args.questions = args.questions or (600 if args.quick else 2000)
    args.docs = args.docs or (12 if args.quick else 60)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
