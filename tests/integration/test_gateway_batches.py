"""The Files and Batch API with the official `openai` client against a real `ragbus gateway`
(batches on, on the gateway's own least-privilege Postgres role) in front of the real processors
and worker: a batch runs to `completed` with one output line per custom_id (an invalid line in
the error file); the gateway AND the worker SIGKILLed mid-batch and restarted still give exactly
one line per custom_id; a cancel stops the rest; a batch past its window expires; a batch's lines
are charged to its tenant's quota; another tenant's key sees none of it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from infra.procs import free_port
from infra.settings import Settings
from producers.bulk.runner import request_id_for
from producers.cancel import BATCH_CANCELLED
from producers.gateway.batch_store import BatchLease, BatchStore
from schemas import CancelRequest
from tests.helpers import read_events, run_ragbus, spawn, wait_for
from tests.integration.pipeline_support import (
    COMPONENTS,
    Pipeline,
    gateways_healthy,
    pipeline_settings,
    running_pipeline,
    with_database_roles,
    write_keys,
)
from tests.provision import KafkaService, PostgresService

#: Tenants of a fresh deployment, with no documents: short prompts, quick answers.
TENANT, KEY = "acme", "sk-batch-" + uuid.uuid4().hex
RIVAL, RIVAL_KEY = "t", "sk-batch-rival-" + uuid.uuid4().hex


@dataclass
class Stack:
    """The pipeline (processors, worker) and one gateway that the tests may kill and restart."""

    settings: Settings
    pipeline: Pipeline
    port: int
    gateway: subprocess.Popen[bytes] | None = None
    restarts: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    async def start_gateway(self, name: str = "gateway", port: int | None = None, **env: str) -> None:
        p = self.pipeline
        port = port or self.port
        proc = spawn(["gateway", "--port", str(port)], self.settings, p.logs / f"{name}.log", **env)
        p.procs[name] = proc
        if name == "gateway":
            self.gateway = proc

        async def healthy() -> bool:
            p.assert_alive()
            return await gateways_healthy(f"http://127.0.0.1:{port}")

        await wait_for(healthy, timeout=120, what=f"the {name}")

    async def stop_gateway(self, name: str) -> None:
        """SIGTERM the extra gateway `name` and wait for it; requests go to the first one again."""
        proc = self.pipeline.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 60)

    def kill(self, name: str) -> None:
        proc = self.pipeline.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def restart_worker(self) -> None:
        p = self.pipeline
        p.procs["worker"] = spawn(COMPONENTS["worker"], self.settings, p.logs / "worker.log")


@pytest.fixture(scope="module")
async def stack(
    kafka: KafkaService, postgres: PostgresService, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("batches")
    keys = write_keys(root, (KEY, TENANT, "alice"), (RIVAL_KEY, RIVAL, "mallory"))
    s = await pipeline_settings(kafka, postgres, root, gateway_timeout_s=240.0)
    s = (await with_database_roles(s)).model_copy(
        update={
            "gateway_batches": True,
            "gateway_keys_file": keys,
            "gateway_batch_poll_s": 0.5,
            "gateway_batch_window": 4,
        }
    )

    async def no_wait(_: Pipeline) -> bool:
        return True

    async with running_pipeline(s, root, ["worker", "processors"], ready=no_wait) as p:
        st = Stack(s, p, free_port())
        await st.start_gateway()
        # Warm up: the worker loads its model on the first request.
        warm = await st.client().chat.completions.create(
            model="ragbus", messages=[{"role": "user", "content": "Say hi."}], max_tokens=2, timeout=240
        )
        assert warm.choices, p.log_tail()
        yield st


def _lines(n: int, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i:03d}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "ragbus",
                "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                "max_tokens": 4,
            },
        }
        for i in range(n)
    ]


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


async def _submit(client: openai.AsyncOpenAI, lines: list[dict[str, Any]]) -> tuple[str, str]:
    upload = await client.files.create(file=("requests.jsonl", _jsonl(lines)), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == len(_jsonl(lines))
    batch = await client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"test": "batches"},
    )
    assert batch.status in ("validating", "in_progress"), batch
    assert batch.metadata == {"test": "batches"}
    return upload.id, batch.id


async def _until(
    stack: Stack, batch_id: str, done: Any, *, timeout: float = 400, what: str = "the batch"
) -> openai.types.Batch:
    async def check() -> openai.types.Batch | None:
        try:
            batch = await stack.client().batches.retrieve(batch_id)
        except (openai.APIConnectionError, openai.InternalServerError):
            return None  # the gateway is restarting
        assert batch.status != "failed", (batch.errors, stack.pipeline.log_tail())
        return batch if done(batch) else None

    return await wait_for(check, timeout=timeout, interval=0.3, what=what)  # type: ignore[no-any-return]


async def _content(stack: Stack, file_id: str) -> list[dict[str, Any]]:
    body = await stack.client().files.content(file_id)
    return [json.loads(line) for line in body.text.splitlines()]


async def test_a_batch_completes_with_one_line_per_custom_id_and_is_the_tenants_only(stack: Stack) -> None:
    client = stack.client()
    lines = _lines(10, "ok")
    bad = {"custom_id": "bad-1", "url": "/v1/chat/completions", "body": {"messages": "not a list"}}
    file_id, batch_id = await _submit(client, [*lines, bad])

    batch = await _until(stack, batch_id, lambda b: b.status == "completed")
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        11,
        10,
        1,
    )
    assert batch.output_file_id and batch.error_file_id and batch.completed_at and batch.in_progress_at
    rows = await _content(stack, batch.output_file_id)
    assert sorted(r["custom_id"] for r in rows) == [line["custom_id"] for line in lines]
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in rows)
    assert all(r["response"]["body"]["object"] == "chat.completion" for r in rows)
    errors = await _content(stack, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["bad-1"] and errors[0]["error"]["code"] == "invalid_request"
    out_file = await client.files.retrieve(batch.output_file_id)
    assert out_file.purpose == "batch_output"

    # Paging: newest first, `after` the last id of a page.
    _, second = await _submit(client, _lines(1, "page"))
    page = await client.batches.list(limit=1)
    assert [b.id for b in page.data] == [second] and page.has_more
    after = await client.batches.list(limit=1, after=second)
    assert [b.id for b in after.data] == [batch_id]
    await _until(stack, second, lambda b: b.status == "completed")

    # Another tenant's key sees nothing of it: 404 everywhere, exactly as for an unknown id.
    rival = stack.client(RIVAL_KEY)
    for call in (
        lambda: rival.batches.retrieve(batch_id),
        lambda: rival.batches.cancel(batch_id),
        lambda: rival.files.retrieve(file_id),
        lambda: rival.files.content(batch.output_file_id),  # type: ignore[arg-type]
        lambda: rival.files.delete(file_id),
        lambda: rival.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            await call()
    assert (await rival.batches.list()).data == []
    assert (await rival.files.list()).data == []

    # The owner may delete its input file once the batch is done.
    deleted = await client.files.delete(file_id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(file_id)


async def test_gateway_and_worker_sigkilled_mid_batch_still_answer_each_line_once(stack: Stack) -> None:
    n = 40
    lines = _lines(n, "kill")
    _, batch_id = await _submit(stack.client(), lines)
    await _until(
        stack, batch_id, lambda b: b.request_counts and b.request_counts.completed >= 6, what="a few answers"
    )

    stack.kill("gateway")
    stack.kill("worker")
    stack.restart_worker()
    await stack.start_gateway()  # resumes the batch at start

    batch = await _until(stack, batch_id, lambda b: b.status == "completed")
    assert batch.request_counts is not None and batch.request_counts.completed == n, batch.request_counts
    assert batch.output_file_id and batch.error_file_id is None
    rows = await _content(stack, batch.output_file_id)
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == n and set(ids) == {line["custom_id"] for line in lines}, (len(ids), len(set(ids)))
    assert all(r["response"]["status_code"] == 200 for r in rows)
    log = (stack.pipeline.logs / "gateway.log").read_text()
    assert f"batch {batch_id}: resuming its job" in log


async def test_another_gateway_takes_over_the_batch_of_a_gateway_that_died(stack: Stack) -> None:
    """Two gateways on one database and home: the one that runs a batch (the one it was created
    on, unless the other's sweep was quicker) is SIGKILLed, and the other's sweep takes its lease
    and finishes it, one line per custom_id."""
    ports = {"gateway": stack.port, "gateway-b": free_port()}
    await stack.start_gateway("gateway-b", ports["gateway-b"])
    logs = stack.pipeline.logs
    try:
        n = 30
        lines = _lines(n, "takeover")
        _, batch_id = await _submit(stack.client(), lines)
        await _until(
            stack, batch_id, lambda b: b.request_counts and b.request_counts.completed >= 4, what="answers"
        )
        started = f"batch {batch_id} (tenant {TENANT}): running it from validating"
        runner = next(name for name in ports if started in (logs / f"{name}.log").read_text())
        survivor = "gateway-b" if runner == "gateway" else "gateway"
        stack.kill(runner)
        stack.port = ports[survivor]
        batch = await _until(stack, batch_id, lambda b: b.status == "completed")
        assert batch.output_file_id and batch.request_counts and batch.request_counts.completed == n
        ids = [r["custom_id"] for r in await _content(stack, batch.output_file_id)]
        assert len(ids) == n and set(ids) == {line["custom_id"] for line in lines}, len(ids)
        assert f"batch {batch_id}: resuming its job" in (logs / f"{survivor}.log").read_text()
    finally:
        await stack.stop_gateway("gateway-b")
        stack.port = ports["gateway"]
        if stack.pipeline.procs["gateway"].poll() is not None:
            await stack.start_gateway()


async def test_cancel_stops_the_rest_and_keeps_the_answers_so_far(stack: Stack) -> None:
    n = 60
    _, batch_id = await _submit(stack.client(), _lines(n, "cancel"))
    await _until(
        stack, batch_id, lambda b: b.request_counts and b.request_counts.completed >= 2, what="first answers"
    )
    # The gateway holds the batch's lease while it runs it: nobody else (another gateway) may.
    store = await BatchStore.open(stack.settings)
    try:
        assert await BatchLease.take(store, batch_id) is None
        other = await BatchLease.take(store, "batch_unrelated")
        assert other is not None
        assert await BatchLease.take(store, "batch_unrelated") is None  # one holder at a time
        await other.release()
        again = await BatchLease.take(store, "batch_unrelated")
        assert again is not None
        await again.release()
    finally:
        await store.close()
    cancelling = await stack.client().batches.cancel(batch_id)
    assert cancelling.status in ("cancelling", "cancelled"), cancelling.status
    batch = await _until(stack, batch_id, lambda b: b.status == "cancelled", timeout=120)
    assert batch.cancelled_at and batch.cancelling_at
    assert batch.output_file_id, batch
    rows = await _content(stack, batch.output_file_id)
    ids = [r["custom_id"] for r in rows]
    assert 2 <= len(ids) < n and len(set(ids)) == len(ids), len(ids)
    assert batch.request_counts is not None and batch.request_counts.completed == len(ids)
    # A cancelled batch stays cancelled: nothing more is answered later.
    await asyncio.sleep(3)
    again = await stack.client().batches.retrieve(batch_id)
    assert again.status == "cancelled" and again.request_counts == batch.request_counts
    # The lines on their way when the batch was cancelled were cancelled too (all 60 go out at
    # once, a window of 64, so some were in flight), for the worker to stop between decode steps.
    cancels = await read_events(stack.settings, stack.settings.topics.tenant(TENANT).cancel, CancelRequest)
    mine = {c.request_id for c in cancels if c.reason == BATCH_CANCELLED}
    lines = {request_id_for(TENANT, batch_id, f"cancel-{i:03d}") for i in range(n)}
    assert mine and mine <= lines, cancels[:3]


async def test_a_batch_past_its_window_expires_with_every_line_answered_or_expired_once(stack: Stack) -> None:
    """A batch created on a gateway whose completion window is 12 s (`gateway_batch_expiry_s`;
    OpenAI's is 24 h) and too long to finish in it ends `expired`: the answers so far in the output
    file, every other line once in the error file as `batch_expired`, the counts adding up."""
    ports = {"gateway": stack.port, "gateway-x": free_port()}
    await stack.start_gateway("gateway-x", ports["gateway-x"], RAGBUS_GATEWAY_BATCH_EXPIRY_S="12")
    stack.port = ports["gateway-x"]
    try:
        n = 400
        lines = _lines(n, "expire")
        _, batch_id = await _submit(stack.client(), lines)
        created = await stack.client().batches.retrieve(batch_id)
        assert created.expires_at is not None and created.expires_at - created.created_at in (12, 13)
        batch = await _until(stack, batch_id, lambda b: b.status == "expired", timeout=120)
        assert batch.expired_at and batch.request_counts is not None
        counts = batch.request_counts
        assert counts.total == n and counts.completed + counts.failed == n and counts.failed > 0, counts
        answered = await _content(stack, batch.output_file_id) if batch.output_file_id else []
        assert len(answered) == counts.completed
        assert all(r["response"]["status_code"] == 200 for r in answered)
        assert batch.error_file_id
        expired = await _content(stack, batch.error_file_id)
        assert {e["error"]["code"] for e in expired} == {"batch_expired"}, expired[:2]
        ids = [r["custom_id"] for r in answered + expired]
        assert len(ids) == n and set(ids) == {line["custom_id"] for line in lines}, len(ids)
        # An expired batch stays expired: nothing more is answered later.
        await asyncio.sleep(3)
        again = await stack.client().batches.retrieve(batch_id)
        assert again.status == "expired" and again.request_counts == counts
    finally:
        await stack.stop_gateway("gateway-x")
        stack.port = ports["gateway"]


async def test_a_batchs_lines_are_charged_to_its_tenants_quota(stack: Stack) -> None:
    """The gateway restarted with quotas on and the tenant's monthly budget at 300 tokens: a batch
    of 30 answers lines while the budget lasts, then answers the rest `quota_exceeded` in the error
    file, each line once; `ragbus usage` counts exactly the answered lines' tokens."""
    s = stack.settings
    budget = 300
    code, _, err = await run_ragbus(s, "tenants", "limits", TENANT, "--monthly-tokens", str(budget))
    assert code == 0, err
    stack.kill("gateway")
    await stack.start_gateway(RAGBUS_GATEWAY_QUOTAS="true")
    try:
        n = 30
        lines = _lines(n, "quota")
        for line in lines:  # questions not asked before: an answer-cache hit would cost nothing
            line["body"]["messages"][0]["content"] += f" (ref {uuid.uuid4().hex[:8]})"
        _, batch_id = await _submit(stack.client(), lines)
        batch = await _until(stack, batch_id, lambda b: b.status == "completed")
        counts = batch.request_counts
        assert counts is not None and counts.completed >= 1 and counts.failed >= 1, counts
        assert counts.completed + counts.failed == n
        answered = await _content(stack, batch.output_file_id) if batch.output_file_id else []
        refused = await _content(stack, batch.error_file_id) if batch.error_file_id else []
        assert {e["error"]["code"] for e in refused} == {"quota_exceeded"}, refused[:2]
        assert "tokens per month" in refused[0]["error"]["message"]
        ids = [r["custom_id"] for r in answered + refused]
        assert len(ids) == n and set(ids) == {line["custom_id"] for line in lines}, len(ids)
        code, out, err = await run_ragbus(s, "usage", "--json", "--tenant", TENANT)
        assert code == 0, err
        (row,) = json.loads(out)
        used = sum(r["response"]["body"]["usage"]["total_tokens"] for r in answered)
        assert row["ok_requests"] == len(answered) and row["tokens_this_month"] == used, (row, used)
    finally:
        await run_ragbus(s, "tenants", "limits", TENANT, "--reset")
        stack.kill("gateway")
        await stack.start_gateway()


async def test_files_api_refusals(stack: Stack) -> None:
    client = stack.client()
    with pytest.raises(openai.BadRequestError) as err:
        await client.files.create(file=("x.jsonl", b'{"custom_id": "a"}\n'), purpose="fine-tune")
    assert err.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(
            input_file_id="file-doesnotexist", endpoint="/v1/chat/completions", completion_window="24h"
        )
    upload = await client.files.create(file=("x.jsonl", b'{"custom_id": "a"}\n'), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        await client.batches.create(
            input_file_id=upload.id,
            endpoint="/v1/embeddings",  # type: ignore[arg-type]
            completion_window="24h",
        )
    assert err.value.body["param"] == "endpoint"  # type: ignore[index]
    # A file whose lines repeat a custom_id: the batch fails at validation, naming the line.
    dup = await client.files.create(
        file=("dup.jsonl", _jsonl(_lines(2, "dup") + _lines(1, "dup"))), purpose="batch"
    )
    created = await client.batches.create(
        input_file_id=dup.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def failed() -> openai.types.Batch | None:
        b = await client.batches.retrieve(created.id)
        return b if b.status == "failed" else None

    batch = await wait_for(failed, timeout=60, what="the batch to fail")
    assert batch.errors and batch.errors.data and batch.errors.data[0].code == "duplicate_custom_id"
    assert batch.errors.data[0].line == 3
