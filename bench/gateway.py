"""What the HTTP gateway adds to a question: the same questions asked one at a time through
`ragbus gateway` (HTTP, httpx with keep-alive, as the openai client does) and through the bus client
(producers/client ChatClient), against the same running pipeline.

The processors, the worker and the gateway run as the `ragbus` processes a deployment runs, against
a throwaway local broker. The tenant has no documents and the worker's answer cache is off, so each
question is a short generation (greedy, `--max-tokens`) and both ways do the same work. The two ways
alternate which goes first on each question, so drift (the machine's load, the model's caches)
falls on both alike. `overhead = gateway e2e - bus client e2e` at the median and at p99.

`/v1/embeddings` is served in-process by the gateway (the processors' model, on a worker thread):
its cost is measured the same way against the raw model in this process (`SentenceTransformer.encode`
of the same text, torch's default threads on both sides), one text per request, alternating.

Usage:
    .venv/bin/python bench/gateway.py [--quick] [--questions N] [--max-tokens T]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
from tqdm import tqdm

from bench.components import ComponentProcess, bench_settings
from bench.e2e import CACHE, QUESTIONS, pct
from infra.kafka.security import ensure_tenant
from infra.procs import free_port
from infra.secrets import as_tenant
from infra.settings import Settings
from processors.embedding import load_model
from producers.client import ChatClient
from tests.provision import kafka_service

log = logging.getLogger("bench.gateway")
#: A tenant with no documents: retrieval finds nothing, the prompt stays short.
TENANT = "benchgw"
KEY = "sk-bench-" + uuid.uuid4().hex


async def via_gateway(http: httpx.AsyncClient, question: str, max_tokens: int) -> float:
    started = time.perf_counter()
    r = await http.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    elapsed = (time.perf_counter() - started) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"gateway answered {r.status_code}: {r.text[:300]}")
    return elapsed


async def via_bus(client: ChatClient, question: str, max_tokens: int) -> float:
    started = time.perf_counter()
    await client.ask(question, max_tokens=max_tokens, temperature=0, timeout=120)
    return (time.perf_counter() - started) * 1000


async def embeddings_pairs(http: httpx.AsyncClient, s: Settings, n: int) -> tuple[list[float], list[float]]:
    """(gateway /v1/embeddings ms, raw encode ms) for `n` texts, one per request, alternating."""
    model = await asyncio.to_thread(load_model, s.embedding_model)
    gateway_ms: list[float] = []
    raw_ms: list[float] = []

    async def gateway(text: str) -> None:
        started = time.perf_counter()
        r = await http.post("/v1/embeddings", json={"input": text, "model": "ragbus-embed"})
        gateway_ms.append((time.perf_counter() - started) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"gateway answered {r.status_code}: {r.text[:300]}")

    async def raw(text: str) -> None:
        started = time.perf_counter()
        await asyncio.to_thread(model.encode, [text], normalize_embeddings=True)
        raw_ms.append((time.perf_counter() - started) * 1000)

    await gateway(QUESTIONS[0])  # the gateway loads its model on the first request
    await raw(QUESTIONS[0])
    gateway_ms.clear()  # the warm-ups are not measured
    raw_ms.clear()
    for i in tqdm(range(n), unit="text", desc="embeddings: gateway vs raw"):
        text = f"{QUESTIONS[i % len(QUESTIONS)]} (ref {uuid.uuid4().hex[:6]})"
        first, second = (gateway, raw) if i % 2 == 0 else (raw, gateway)
        await first(text)
        await second(text)
    return gateway_ms, raw_ms


async def measure(
    s: Settings, url: str, args: argparse.Namespace
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(gateway e2e ms, bus e2e ms) per question, in the order asked, then (gateway, raw) ms per
    embeddings request."""
    gateway_ms: list[float] = []
    bus_ms: list[float] = []
    headers = {"authorization": f"Bearer {KEY}"}
    async with (
        ChatClient(as_tenant(s, TENANT), remember=False) as client,
        httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http,
    ):
        # Warm up both ways (models loaded, consumer groups joined, the tenant's gateway client up).
        deadline = time.monotonic() + 300
        while True:
            try:
                await via_gateway(http, QUESTIONS[0], args.max_tokens)
                break
            except (RuntimeError, httpx.HTTPError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(2)
        for q in QUESTIONS[:3]:
            await via_bus(client, q, args.max_tokens)
            await via_gateway(http, q, args.max_tokens)
        for i in tqdm(range(args.questions), unit="q", desc="gateway vs bus client"):
            # The same text both ways (the cache is off); a fresh ref per pair.
            question = f"{QUESTIONS[i % len(QUESTIONS)]} (ref {uuid.uuid4().hex[:6]})"
            if i % 2 == 0:
                gateway_ms.append(await via_gateway(http, question, args.max_tokens))
                bus_ms.append(await via_bus(client, question, args.max_tokens))
            else:
                bus_ms.append(await via_bus(client, question, args.max_tokens))
                gateway_ms.append(await via_gateway(http, question, args.max_tokens))
        emb_gateway, emb_raw = await embeddings_pairs(http, s, args.questions)
    return gateway_ms, bus_ms, emb_gateway, emb_raw


async def run(args: argparse.Namespace) -> None:
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    with tempfile.TemporaryDirectory(prefix="ragbus-bench-gateway-") as tmp:
        work = Path(tmp)
        with kafka_service(work / "kafka", cache=CACHE, version=defaults.kafka_version) as kafka:
            s = bench_settings(kafka.bootstrap, work, kafka.client)
            await ensure_tenant(s, TENANT)
            keys = work / "keys.toml"
            keys.write_text(f'[[keys]]\nkey = "{KEY}"\ntenant = "{TENANT}"\nuser = "bench"\n')
            port = free_port()
            no_cache = {"RAGBUS_RESPONSE_CACHE_SIZE": "0"}
            parts = [
                ComponentProcess(s, ["processors", "run"], work / "processors.log"),
                ComponentProcess(s, ["worker", "run"], work / "worker.log", env=no_cache),
                ComponentProcess(
                    s,
                    ["gateway"],
                    work / "gateway.log",
                    env={
                        "RAGBUS_GATEWAY_PORT": str(port),
                        "RAGBUS_GATEWAY_KEYS_FILE": str(keys),
                        "RAGBUS_GATEWAY_TIMEOUT_S": "120",
                    },
                ),
            ]
            for p in parts:
                p.start()
            try:
                gateway_ms, bus_ms, emb_gateway, emb_raw = await measure(s, f"http://127.0.0.1:{port}", args)
                if not all(p.alive() for p in parts):
                    raise SystemExit(f"a component died during the run; see the logs in {work}")
            finally:
                for p in parts:
                    p.stop()
    report(gateway_ms, bus_ms, emb_gateway, emb_raw)


def report(
    gateway_ms: list[float], bus_ms: list[float], emb_gateway: list[float], emb_raw: list[float]
) -> None:
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    diffs = [g - b for g, b in zip(gateway_ms, bus_ms, strict=True)]
    print(f"\n{len(gateway_ms)} questions each way")
    print(f"{'ms':<28}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}")
    rows = (
        ("gateway e2e", gateway_ms),
        ("bus client e2e", bus_ms),
        ("per-pair diff", diffs),
        ("embeddings via gateway", emb_gateway),
        ("embeddings raw encode", emb_raw),
    )
    for name, values in rows:
        print(
            f"{name:<28}{pct(values, 50):>9.1f}{pct(values, 90):>9.1f}{pct(values, 99):>9.1f}"
            f"{statistics.fmean(values):>9.1f}"
        )
    p50 = pct(gateway_ms, 50) - pct(bus_ms, 50)
    p99 = pct(gateway_ms, 99) - pct(bus_ms, 99)
    print(
        f"RESULT gateway_overhead_p50_ms={p50:.1f} gateway_overhead_p99_ms={p99:.1f} "
        f"gateway_e2e_p50_ms={pct(gateway_ms, 50):.1f} bus_e2e_p50_ms={pct(bus_ms, 50):.1f} "
        f"embeddings_overhead_p50_ms={pct(emb_gateway, 50) - pct(emb_raw, 50):.1f} "
        f"embeddings_gateway_p50_ms={pct(emb_gateway, 50):.1f} embeddings_raw_p50_ms={pct(emb_raw, 50):.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 questions each way instead of 200")
    parser.add_argument("--questions", type=int, help="questions each way (default 200; --quick 40)")
    parser.add_argument("--max-tokens", type=int, default=8, help="answer length cap")
    args = parser.parse_args()
    args.questions = args.questions or (40 if args.quick else 200)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
