"""Several processors and workers in one deployment, against a real Milvus server: `ragbus start
processors worker --instances 2`, a bulk job, one processors instance and one worker SIGKILLed
a third of the way through, a third worker joining at two thirds. Every line is answered exactly
once, and both processors instances did work (their per-instance counters)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from cli.background import BY_NAME, Background, backgrounds
from infra.settings import Settings
from schemas import ChatResponse
from tests.helpers import env_for, read_events, run_ragbus, spawn, wait_for
from tests.integration.pipeline_support import pipeline_settings
from tests.provision import KafkaService, MilvusService, PostgresService

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

#: A tenant with no documents (short prompts: the job's answers take seconds).
NODOCS = "nodocs"
#: A processors instance's counters line (processors/service.py) and its retrieval counts.
COUNTERS = re.compile(r"processors \S+ since start: (.*)")
RETRIEVED = re.compile(r"retrieval-\w+ (\d+) records")


def _retrieved(log: Path) -> int:
    """Questions a processors instance retrieved for, by the last counters line it logged."""
    found = COUNTERS.findall(log.read_text(errors="replace")) if log.exists() else []
    return sum(int(n) for n in RETRIEVED.findall(found[-1])) if found else 0


async def test_two_processors_and_workers_share_the_work_through_kills_and_a_join(
    kafka: KafkaService, postgres: PostgresService, milvus_server: MilvusService, tmp_path: Path
) -> None:
    n = 60
    s: Settings = await pipeline_settings(
        kafka,
        postgres,
        tmp_path,
        tenants=(NODOCS,),
        kafka_partitions=4,
        milvus_uri=milvus_server.uri,
        instance_id=f"scale-{tmp_path.name[-6:]}",
        processors_stats_s=0.5,
    )
    questions, out = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    with questions.open("w") as f:
        for i in range(n):
            body = {"messages": [{"role": "user", "content": f"What is {i} times two?"}], "max_tokens": 4}
            line = {"custom_id": f"q-{i:02d}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            f.write(json.dumps(line) + "\n")

    code, o, e = await run_ragbus(s, "start", "processors", "worker", "--instances", "2")
    assert code == 0, o + e
    procs = {bg.name: bg for bg in backgrounds(s, ["processors", "worker"])}
    assert set(procs) == {"processors", "processors-1", "worker", "worker-1"}, procs

    def logs() -> str:
        return "\n".join(f"--- {n} ---\n{bg.log_path.read_text()[-2000:]}" for n, bg in procs.items())

    def answered() -> int:
        return len(out.read_text().splitlines()) if out.exists() else 0

    args = ["bulk", "submit", str(questions), "--out", str(out), "--tenant", NODOCS, "--job", "scale"]
    bulk = spawn([*args, "--window", "8", "--no-progress"], s, tmp_path / "bulk.log")
    try:

        async def past(count: int) -> bool:
            assert bulk.poll() in (None, 0), (tmp_path / "bulk.log").read_text()[-3000:]
            return answered() >= count or bulk.poll() == 0

        # Both processors instances have taken questions before one of them is killed.
        await wait_for(
            lambda: _both_retrieved(procs),
            timeout=300,
            what="both processors instances to retrieve",
        )
        await wait_for(lambda: past(n // 3), timeout=300, what="a third of the job")
        for name in ("processors-1", "worker-1"):
            pid = procs[name].pid
            assert pid is not None, logs()
            os.killpg(pid, signal.SIGKILL)
        await wait_for(lambda: past(2 * n // 3), timeout=300, what="two thirds after the kills")
        third = Background(s, BY_NAME["worker"], 2)
        third.start(env=env_for(s))
        procs["worker-2"] = third
        await wait_for(lambda: past(n), timeout=300, what="the whole job")
        assert await asyncio.to_thread(bulk.wait, 60) == 0
    except (AssertionError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{logs()}") from e
    finally:
        if bulk.poll() is None:
            bulk.kill()
        await run_ragbus(s, "stop")

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in rows) == [f"q-{i:02d}" for i in range(n)]
    assert all(r["error"] is None for r in rows), [r for r in rows if r["error"]][:3]
    responses = await read_events(s, s.topics.tenant(NODOCS).responses("bulk"), ChatResponse, timeout=20)
    per_request = Counter(r.request_id for r in responses)
    assert len(per_request) == n and set(per_request.values()) == {1}, per_request.most_common(3)
    # The third worker joined the group and was given partitions of the lanes.
    assert re.search(r"partitions assigned: (?!none)", procs["worker-2"].log_path.read_text()), logs()


async def _both_retrieved(procs: dict[str, Background]) -> bool:
    return all(_retrieved(procs[name].log_path) > 0 for name in ("processors", "processors-1"))
