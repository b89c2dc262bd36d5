"""What the bus costs the model: the same RAG prompts through Kafka to the inference worker, and
straight to the same engine as one offline batch, in one run.

- throughput: N requests (distinct RAG prompts, greedy, fixed max_tokens) fed at once onto
  `chat.enriched`; the clock runs from the first send to the last committed response. The raw side
  hands the same prompts to `engine.generate` in one call (the engine splits them into batches of
  its max_batch), before and after the worker run; the ratio uses the mean of the two raw runs so
  drift from other load on the machine cancels. `worker_ratio = worker tok/s / raw tok/s` counts
  completion tokens.
- added latency: single requests, one at a time, through the bus (send → committed response seen
  by a read_committed consumer) minus the same request straight to the engine; p50 and p99.

The broker is a throwaway one (tests.provision). Usage:
    .venv/bin/python bench/worker.py [--quick] [--requests N] [--max-tokens T] [--backend llamacpp]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tqdm import tqdm

from inference_workers.engines.base import Engine, Generation
from inference_workers.prompt import build_prompt
from inference_workers.router import Router
from inference_workers.worker.service import InferenceWorker
from infra.kafka.clients import make_consumer, make_producer, topic_partitions
from infra.kafka.codec import encode
from infra.kafka.topics import declare_topics
from infra.settings import Settings
from schemas import ChatRequest, ChatResponse, EnrichedRequest, RetrievedChunk, SamplingParams
from tests.provision import kafka_service

log = logging.getLogger("bench.worker")
#: The tenant the bench's requests belong to (its answers come on that tenant's responses topic).
TENANT = "bench"

FACTS = [
    ("What colour is the sky on Zorblat?", "On the planet Zorblat the sky is green and the grass is purple."),
    ("Who founded the Quillmark company?", "The Quillmark company was founded by Elena Vasquez in 1987."),
    (
        "What is the staff wifi password?",
        "The staff wifi password is tangerine42. Guests use the open network.",
    ),
    ("Where is the Harbor Museum?", "The Harbor Museum is located in Valparaiso and opened in 1952."),
]
FILLER = "The office kitchen is cleaned every Friday afternoon by the facilities team."


def requests(n: int, max_tokens: int) -> list[EnrichedRequest]:
    out = []
    for i in range(n):
        q, passage = FACTS[i % len(FACTS)]
        req = ChatRequest(
            tenant_id=TENANT, question=f"{q} (ticket {i})", sampling=SamplingParams(max_tokens=max_tokens)
        )
        chunks = [
            RetrievedChunk(chunk_id=f"f{i}", doc_id="filler", text=FILLER, score=0.3),
            RetrievedChunk(chunk_id=f"a{i}", doc_id="facts", text=passage, score=0.9),
        ]
        out.append(EnrichedRequest(**req.envelope(), request=req, chunks=chunks))
    return out


def generations(engine: Engine, events: list[EnrichedRequest]) -> list[Generation]:
    gens = []
    for ev in events:
        built = build_prompt(
            ev, render=engine.render, count=engine.count_tokens, context_window=engine.context_window
        )
        gens.append(Generation(built.text, ev.request.sampling, ev.request_id))
    return gens


async def raw_run(engine: Engine, events: list[EnrichedRequest]) -> tuple[float, int]:
    gens = generations(engine, events)
    t0 = time.perf_counter()
    done = await engine.generate(gens)
    return time.perf_counter() - t0, sum(c.completion_tokens for c in done)


class Replies:
    """A read_committed consumer on chat.responses from its current end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: dict[str, tuple[float, ChatResponse]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:

        self.consumer = make_consumer(self.settings, group_id=None, fetch_max_wait_ms=5)
        await self.consumer.start()
        tps = await topic_partitions(
            self.settings, self.consumer, [self.settings.topics.tenant(TENANT).responses("chat")]
        )
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for recs in batch.values():
                for r in recs:
                    resp = ChatResponse.model_validate_json(r.value)
                    self.seen[resp.request_id] = (now, resp)

    async def wait(self, ids: set[str], timeout: float = 1800) -> None:
        end = time.perf_counter() + timeout
        while not ids <= set(self.seen):
            if time.perf_counter() > end:
                raise TimeoutError(f"{len(ids - set(self.seen))} responses missing")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()


async def send(producer: object, settings: Settings, events: list[EnrichedRequest]) -> None:
    for ev in events:
        enc = encode(ev)
        await producer.send(settings.topics.enriched("chat"), enc.value, key=enc.key, headers=enc.headers)  # type: ignore[attr-defined]
    await producer.flush()  # type: ignore[attr-defined]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def main(args: argparse.Namespace) -> None:
    n, max_tokens, probes = (16, 16, 8) if args.quick else (args.requests, args.max_tokens, args.probes)
    cache = Path(os.environ.get("RAGBUS_TEST_CACHE", Path.home() / ".cache" / "ragbus"))
    work = Path(tempfile.mkdtemp(prefix="ragbus-bench-worker-"))
    base = Settings(_env_file=None)  # type: ignore[call-arg]
    print(
        f"requests={n} max_tokens={max_tokens} probes={probes} backend={args.backend} "
        f"batch={args.batch} load={os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with kafka_service(work / "kafka", cache=cache, version=base.kafka_version) as kafka:
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        model = "packaged:smollm2"
        if args.backend == "vllm":  # the converted folder, cached like the tests' (`ragbus models prepare`)
            from inference_workers.prepare import prepare_packaged

            model = str(prepare_packaged(Settings(home=cache, _env_file=None)))  # type: ignore[call-arg]
        settings = Settings(
            kafka_bootstrap=kafka.bootstrap,
            **kafka.client,
            topic_prefix=prefix,
            instance_id=prefix,
            home=work / "home",
            kafka_partitions=2,
            response_cache_size=0,
            llm_max_batch=args.batch,
            llm_context_window=2048,
            llm_models=[{"name": "bench", "backend": args.backend, "model": model}],
            _env_file=None,  # type: ignore[call-arg]
        )
        await declare_topics(settings, tenants=[TENANT])
        router = Router(settings)
        await router.start()
        engine = router.engines["bench"]
        worker = InferenceWorker(settings, router=router)
        replies = Replies(settings)
        producer = make_producer(settings, linger_ms=0)
        await producer.start()
        await replies.start()
        stop = asyncio.Event()
        await worker.start()
        task = asyncio.create_task(worker.run(stop))
        try:
            # warm-up: one request each way
            warm = requests(2, 4)
            await raw_run(engine, warm[:1])
            await send(producer, settings, warm[1:])
            await replies.wait({warm[1].request_id})

            raw1_s, raw1_tok = await raw_run(engine, requests(n, max_tokens))
            print(f"raw (1): {raw1_tok} tokens in {raw1_s:.2f} s = {raw1_tok / raw1_s:.1f} tok/s", flush=True)

            events = requests(n, max_tokens)
            t0 = time.perf_counter()
            await send(producer, settings, events)
            await replies.wait({e.request_id for e in events})
            worker_s = time.perf_counter() - t0
            worker_tok = sum(replies.seen[e.request_id][1].usage.completion_tokens for e in events)
            print(
                f"worker: {worker_tok} tokens in {worker_s:.2f} s = {worker_tok / worker_s:.1f} tok/s "
                f"(batches {worker.stats.batch_sizes[1:]})",
                flush=True,
            )

            raw2_s, raw2_tok = await raw_run(engine, requests(n, max_tokens))
            print(f"raw (2): {raw2_tok} tokens in {raw2_s:.2f} s = {raw2_tok / raw2_s:.1f} tok/s", flush=True)

            added: list[float] = []
            for ev in tqdm(requests(probes, max_tokens), desc="latency probes", file=sys.stderr):
                raw_s, _ = await raw_run(
                    engine, [ev.model_copy(update={"request_id": ev.request_id + "-raw"})]
                )
                t1 = time.perf_counter()
                await send(producer, settings, [ev])
                await replies.wait({ev.request_id})
                bus_s = replies.seen[ev.request_id][0] - t1
                added.append((bus_s - raw_s) * 1000)
        finally:
            stop.set()
            await asyncio.wait_for(task, 120)
            await replies.stop()
            await producer.stop()
            await router.close()
    raw_tok_s = (raw1_tok / raw1_s + raw2_tok / raw2_s) / 2
    worker_tok_s = worker_tok / worker_s
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(
        f"RESULT worker_ratio={worker_tok_s / raw_tok_s:.3f} worker_tok_s={worker_tok_s:.1f} "
        f"raw_tok_s={raw_tok_s:.1f} added_p50_ms={statistics.median(added):.1f} "
        f"added_p99_ms={pct(added, 0.99):.1f}"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 requests of 16 tokens, 8 latency probes")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--probes", type=int, default=24)
    p.add_argument("--batch", type=int, default=32, help="llm_max_batch (and the engine's)")
    p.add_argument("--backend", default="llamacpp", choices=["llamacpp", "vllm"])
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("inference_workers").setLevel(os.environ.get("BENCH_LOG", "WARNING"))
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the throwaway broker is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    asyncio.run(main(p.parse_args()))
