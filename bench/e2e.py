"""End-to-end latency under steady load, split by stage: ChatClient → requests topic → retrieval
processor → enriched topic → inference worker → responses topic → ChatClient.

The processors and the worker run as the `ragbus` processes a deployment runs, against a throwaway
local broker; the sample documents are indexed first. Then `--clients` clients (closed loop: each
asks again as soon as it has its answer) keep the pipeline busy for `--seconds`, each question
timed by the client from send to answer. Every answer carries its stage timings, so
the end-to-end time splits into: retrieval queue, embedding, vector search, inference queue (micro-
batch wait and the model being busy), generation, and the rest (Kafka hops, transactions, polling).

`overhead = end-to-end - model time`, where model time is the LLM's generation (`generate_ms`);
embedding and search count as overhead, since they are the pipeline's own work. `bus = end-to-end
- generate - embed - search`: what the queues, hops, polling and commits cost.

Usage:
    .venv/bin/python bench/e2e.py [--quick] [--clients N] [--seconds S] [--max-tokens T]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tqdm import tqdm

from bench.components import ComponentProcess, bench_settings
from infra.kafka.topics import declare_topics
from infra.settings import Settings
from producers.client import ChatClient, ChatError, ChatTimeout
from producers.ingest.client import discover, ingest_files
from schemas import ChatResponse
from tests.provision import kafka_service

log = logging.getLogger("bench.e2e")
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RAGBUS_TEST_CACHE", Path.home() / ".cache" / "ragbus"))
QUESTIONS = [
    "How many days of paid vacation do employees get per year?",
    "What is the phone extension of the IT helpdesk?",
    "What is the daily meal allowance on business trips?",
    "How many weeks of parental leave does Northwind offer?",
    "How long must passwords be?",
    "Who approves travel outside Europe?",
    "How do I reset my laptop password?",
    "Can unused vacation days be carried over?",
]
STAGES = ("retrieval_queue_ms", "embed_ms", "search_ms", "inference_queue_ms", "generate_ms")
#: The stages that do work; everything else a request spends is the bus's.
WORK = ("embed_ms", "search_ms", "generate_ms")


@dataclass
class Sample:
    e2e_ms: float
    response: ChatResponse

    @property
    def model_ms(self) -> float:
        return self.response.timings.generate_ms or 0.0

    @property
    def overhead_ms(self) -> float:
        return self.e2e_ms - self.model_ms

    def stage(self, name: str) -> float:
        return getattr(self.response.timings, name) or 0.0

    @property
    def bus_ms(self) -> float:
        """End to end minus the work (generation, embedding, search): what the queues, hops,
        polling and commits cost."""
        return self.e2e_ms - sum(self.stage(s) for s in WORK)

    @property
    def hops_ms(self) -> float:
        """What no stage accounts for: Kafka hops, transactions, polling, decoding."""
        return self.e2e_ms - sum(self.stage(s) for s in STAGES)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def ask(
    client: ChatClient, question: str, max_tokens: int, out: list[Sample], errors: list[str]
) -> None:
    started = time.perf_counter()
    try:
        response = await client.ask(question, tenant="bench", max_tokens=max_tokens, timeout=300)
    except (ChatError, ChatTimeout) as e:
        errors.append(str(e))
        return
    out.append(Sample((time.perf_counter() - started) * 1000, response))


async def warm_up(client: ChatClient, max_tokens: int) -> None:
    """Until the pipeline answers (models loaded, consumer groups joined), one question at a time."""
    deadline = time.monotonic() + 300
    while True:
        try:
            await client.ask(QUESTIONS[0], tenant="bench", max_tokens=max_tokens, timeout=60)
            break
        except ChatTimeout:
            if time.monotonic() > deadline:
                raise
    for q in QUESTIONS[1:4]:
        await client.ask(q, tenant="bench", max_tokens=max_tokens, timeout=120)


async def steady_load(s: Settings, args: argparse.Namespace) -> tuple[list[Sample], list[str], float]:
    """`--clients` clients, each asking its next question as soon as its last one is answered,
    for `--seconds`: a steady load that never queues a question behind more than the other
    clients' (so the split shows what the pipeline adds, not a backlog)."""
    samples: list[Sample] = []
    errors: list[str] = []
    async with ChatClient(s, remember=False) as client:
        await warm_up(client, args.max_tokens)
        started = time.perf_counter()
        deadline = started + args.seconds
        bar = tqdm(unit="q", desc=f"{args.clients} client(s) for {args.seconds:.0f} s")

        async def one_client(n: int) -> None:
            i = n
            while time.perf_counter() < deadline:
                question = f"{QUESTIONS[i % len(QUESTIONS)]} (ref {uuid.uuid4().hex[:6]})"
                await ask(client, question, args.max_tokens, samples, errors)
                bar.update(1)
                i += args.clients

        await asyncio.gather(*(one_client(n) for n in range(args.clients)))
        bar.close()
        elapsed = time.perf_counter() - started
    return samples, errors, elapsed


async def run(args: argparse.Namespace) -> None:
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    with tempfile.TemporaryDirectory(prefix="ragbus-bench-e2e-") as tmp:
        work = Path(tmp)
        with kafka_service(work / "kafka", cache=CACHE, version=defaults.kafka_version) as kafka:
            s = bench_settings(kafka.bootstrap, work)
            await declare_topics(s)
            parts = [
                ComponentProcess(s, ["processors", "run"], work / "processors.log"),
                ComponentProcess(s, ["worker", "run"], work / "worker.log"),
            ]
            for p in parts:
                p.start()
            try:
                jobs, _ = discover([ROOT / "producers" / "samples" / "docs"])
                report = await ingest_files(s, jobs, tenant="bench", idle_timeout=300)
                if len(report.indexed) != len(jobs):
                    raise SystemExit(f"ingesting the sample documents failed; see {work}/processors.log")
                samples, errors, elapsed = await steady_load(s, args)
                if not all(p.alive() for p in parts):
                    raise SystemExit("a component died during the run")
            finally:
                for p in parts:
                    p.stop()
    report_results(samples, errors, elapsed)


def report_results(samples: list[Sample], errors: list[str], elapsed: float) -> None:
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if errors:
        print(f"{len(errors)} requests failed, e.g. {errors[0]}")
    if not samples:
        raise SystemExit("no answers")
    rows = [
        ("end to end", [x.e2e_ms for x in samples]),
        ("overhead (e2e - generate)", [x.overhead_ms for x in samples]),
    ]
    rows += [(name.removesuffix("_ms"), [x.stage(name) for x in samples]) for name in STAGES]
    rows.append(("hops: transactions, polling", [x.hops_ms for x in samples]))
    rows.append(("bus (e2e - generate - embed - search)", [x.bus_ms for x in samples]))
    print(f"\n{len(samples)} answers in {elapsed:.1f} s")
    print(f"{'ms':<34}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}")
    for name, values in rows:
        print(
            f"{name:<34}{pct(values, 50):>9.1f}{pct(values, 90):>9.1f}{pct(values, 99):>9.1f}"
            f"{statistics.fmean(values):>9.1f}"
        )
    overhead = [x.overhead_ms for x in samples]
    e2e = [x.e2e_ms for x in samples]
    bus = [x.bus_ms for x in samples]
    print(
        f"RESULT overhead_p50_ms={pct(overhead, 50):.1f} overhead_p99_ms={pct(overhead, 99):.1f} "
        f"bus_p50_ms={pct(bus, 50):.1f} bus_p99_ms={pct(bus, 99):.1f} "
        f"e2e_p50_ms={pct(e2e, 50):.1f} e2e_p99_ms={pct(e2e, 99):.1f} rps={len(samples) / elapsed:.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 s of load instead of 300 s")
    parser.add_argument("--clients", type=int, default=1, help="concurrent clients (closed loop)")
    parser.add_argument("--seconds", type=float, help="how long the load lasts (default 300; --quick 60)")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer length cap")
    args = parser.parse_args()
    args.seconds = args.seconds or (60.0 if args.quick else 300.0)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
