"""Quotas hold across gateway processes: TWO `ragbus gateway` processes (quotas on, each on the
gateway's own least-privilege Postgres role) in front of the real worker and processors; a tenant
with a low tokens/min limit spends it through gateway A, and gateway B answers 429 with
Retry-After in OpenAI's error shape; `ragbus usage` (as the read-only role) shows the use."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import urlsplit

import asyncpg
import openai
import pytest

from infra.postgres.roles import GATEWAY_ROLE
from infra.procs import free_port
from infra.settings import Settings
from producers.gateway.quota_report import set_limits
from tests.helpers import run_ragbus, spawn, wait_for
from tests.integration.pipeline_support import (
    Pipeline,
    gateways_healthy,
    pipeline_settings,
    running_pipeline,
    with_database_roles,
    write_keys,
)
from tests.provision import KafkaService, PostgresService

TENANT, KEY = "metered", "sk-quota-" + uuid.uuid4().hex
#: A tenant without limits, to warm the worker up without touching the metered tenant's counts.
FREE, FREE_KEY = "acme", "sk-quota-free-" + uuid.uuid4().hex
#: Tokens per minute of the metered tenant: one request's reservation (about 12 + max_tokens 8)
#: fits, but its real usage (the worker's prompt template alone is more) leaves no room for another.
TPM = 30
QUESTION = "What is the phone extension of the IT helpdesk?"


class Gateways:
    def __init__(self, settings: Settings, urls: list[str], pipeline: Pipeline) -> None:
        self.settings, self.urls, self.pipeline = settings, urls, pipeline

    def client(self, i: int, key: str = KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.urls[i]}/v1", api_key=key, max_retries=0, timeout=240)


@pytest.fixture(scope="module")
async def gateways(
    kafka: KafkaService, postgres: PostgresService, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateways]:
    root = tmp_path_factory.mktemp("quota")
    keys = write_keys(root, (KEY, TENANT, None), (FREE_KEY, FREE, None))
    s = await pipeline_settings(kafka, postgres, root, tenants=(TENANT,), gateway_timeout_s=240.0)
    s = await with_database_roles(s)
    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        await set_limits(conn, TENANT, rpm=None, tpm=TPM, monthly_tokens=None)
    finally:
        await conn.close()
    s = s.model_copy(update={"gateway_quotas": True, "gateway_keys_file": keys})
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    gateway_procs: list[subprocess.Popen[bytes]] = []

    async def no_wait(_: Pipeline) -> bool:
        return True

    async with running_pipeline(s, root, ["worker", "processors"], ready=no_wait) as p:
        try:
            for i, port in enumerate(ports):
                proc = spawn(["gateway", "--port", str(port)], s, p.logs / f"gateway{i}.log")
                gateway_procs.append(proc)
                p.procs[f"gateway{i}"] = proc  # its log in log_tail, its death in assert_alive

            async def healthy() -> bool:
                p.assert_alive()
                return await gateways_healthy(*urls)

            await wait_for(healthy, timeout=120, what="both gateways")
            yield Gateways(s, urls, p)
        finally:
            for proc in gateway_procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in gateway_procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def _ask(client: openai.AsyncOpenAI, question: str) -> openai.types.chat.ChatCompletion:
    return await client.chat.completions.create(
        model="ragbus", messages=[{"role": "user", "content": question}], max_tokens=8
    )


async def test_a_tenant_over_its_tokens_per_minute_gets_429_from_the_other_gateway(
    gateways: Gateways,
) -> None:
    p = gateways.pipeline
    # Warm-up through a tenant without limits: the worker loads its model on the first request.
    warm = await _ask(gateways.client(0, FREE_KEY), "Say hello.")
    assert warm.choices, p.log_tail()

    # The limit is per minute: start with time to spare in this minute (fixed windows).
    now = datetime.now(UTC)
    if now.second > 25:
        await asyncio.sleep(60 - now.second - now.microsecond / 1e6 + 0.5)

    first = await _ask(gateways.client(0), QUESTION)
    assert first.usage is not None, p.log_tail()
    used = first.usage.total_tokens
    estimate = -(-len(QUESTION) // 4) + 8
    assert used + estimate > TPM, f"the answer used only {used} tokens: the test's TPM is too high"

    # Gateway B shares the count: 429, Retry-After within the minute, OpenAI's error shape.
    for i in (1, 0):
        with pytest.raises(openai.RateLimitError) as err:
            await _ask(gateways.client(i), QUESTION)
        retry_after = int(err.value.response.headers["retry-after"])
        assert 1 <= retry_after <= 60
        body = err.value.response.json()
        assert set(body) == {"error"} and body["error"]["code"] == "rate_limit_exceeded", body
        assert body["error"]["type"] == "tokens" and f"limit {TPM}" in body["error"]["message"], body
        assert err.value.response.headers.get("x-request-id")

    # The tenant without limits is not held back by the metered one.
    assert (await _ask(gateways.client(1, FREE_KEY), "Say hi.")).choices

    # `ragbus usage`, as the read-only role: only the successful generation's tokens count.
    code, out, err_text = await run_ragbus(gateways.settings, "usage", "--json", "--tenant", TENANT)
    assert code == 0, err_text
    (row,) = json.loads(out)
    assert (row["tenant"], row["key_id"], row["tpm"]) == (TENANT, "", TPM)
    assert row["ok_requests"] == 1 and row["error_requests"] == 0 and row["cache_hits"] == 0, row
    assert row["tokens_this_month"] == used, row
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        first.usage.prompt_tokens,
        first.usage.completion_tokens,
    )
    # The table (narrow here: the child's terminal width is unknown, so cells are cut).
    code, out, err_text = await run_ragbus(gateways.settings, "usage")
    assert code == 0 and "quota use" in out and TENANT[:4] in out and str(TPM) in out, out + err_text


async def test_the_gateway_role_may_not_change_limits_or_forget_use(gateways: Gateways) -> None:
    dsn = gateways.settings.postgres_dsn_for("gateway")
    assert urlsplit(dsn).username == GATEWAY_ROLE
    conn = await asyncpg.connect(dsn)
    try:
        for statement in (
            f"UPDATE quota_limits SET tpm = 0 WHERE tenant = '{TENANT}'",
            "DELETE FROM quota_counters",
            "SELECT count(*) FROM audit_log",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()
