"""schemathesis with every check against the real gateway: `ragbus gateway`, `worker run` and
`processors run` as child processes on the session's broker, fuzzed through /openapi.json with a
valid API key of a tenant that has no documents (short prompts); quotas and the Files and Batch API
are on, so every route the gateway can serve is fuzzed, including schemathesis's stateful runs
(uploaded file → batch → retrieve/cancel).

What the run is told beyond the spec, and why:
- chat completions and embeddings may refuse a schema-valid body with a 400 or a 413: rules a JSON
  Schema cannot state (the last message is the user's, `n` > 1 not with `stream`, the contract's
  bounds on the question and history together, `dimensions` only the loaded model's, the event
  built from the body fits its topic). Both statuses are in the spec, in OpenAI's error shape.
- a schema-violating body may get 413: a body over the cap is refused before it is parsed.
- chat completions may answer 504: the gateway runs with a short deadline so that fuzzed requests
  asking for thousands of tokens from the CPU model end in bounded time; 504 is in the spec.
Everything else is schemathesis's own defaults with `--checks all`.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from infra.procs import free_port
from tests.integration.pipeline_support import (
    Pipeline,
    pipeline_settings,
    running_pipeline,
    with_database_roles,
    write_keys,
)
from tests.provision import KafkaService, PostgresService

KEY = "sk-st-" + uuid.uuid4().hex
#: A test tenant (its topics are declared) with no documents: answers come from the model alone.
TENANT = "acme"

CONFIG = """
[checks.negative_data_rejection]
expected-statuses = [
  "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]

[[operations]]
include-path-regex = "^/v1/(chat/completions|embeddings)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "413", "429", "5xx"]

[[operations]]
include-path = "/v1/chat/completions"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]
"""


@pytest.fixture(scope="module")
async def gateway_url(
    kafka: KafkaService, postgres: PostgresService, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, Pipeline]]:
    root = tmp_path_factory.mktemp("openapi")
    keys = write_keys(root, (KEY, TENANT, "fuzzer"))
    port = free_port()
    s = await pipeline_settings(
        kafka,
        postgres,
        root,
        tenants=(TENANT,),
        gateway_port=port,
        gateway_keys_file=keys,
        gateway_timeout_s=8.0,
        response_cache_size=0,
    )
    # Quotas (unlimited by default: every request still reserves and settles) and the Files and
    # Batch API on, so their routes are fuzzed too, on the gateway's own database role.
    s = (await with_database_roles(s)).model_copy(update={"gateway_quotas": True, "gateway_batches": True})
    url = f"http://127.0.0.1:{port}"

    async def answers(_: Pipeline) -> bool:
        """Ready when a real question is answered (models loaded, consumer groups joined)."""
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                r = await http.post(
                    f"{url}/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4},
                    headers={"authorization": f"Bearer {KEY}"},
                )
                if r.status_code != 200:
                    return False
                # The embedding model loads on the first embeddings request: not during the run.
                r = await http.post(
                    f"{url}/v1/embeddings",
                    json={"model": "ragbus-embed", "input": "hi"},
                    headers={"authorization": f"Bearer {KEY}"},
                )
                return r.status_code == 200
        except httpx.HTTPError:
            return False

    async with running_pipeline(
        s, root, ["worker", "processors", "gateway"], ready=answers, ready_timeout=300
    ) as p:
        yield url, p


async def test_schemathesis_with_every_check_finds_no_failure(
    gateway_url: tuple[str, Pipeline], tmp_path: Path
) -> None:
    url, pipeline = gateway_url
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cli = Path(sys.executable).with_name("schemathesis")
    proc = await asyncio.create_subprocess_exec(
        str(cli),
        "--no-color",
        "--config-file",
        str(config),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--max-examples",
        "8",
        # One worker: with several threads, hypothesis's lambda descriptions (ast.parse) hit
        # CPython 3.11.7's "AST constructor recursion depth mismatch" (gh-106905) now and then.
        "--workers",
        "1",
        "--seed",
        "20240601",
        "--request-timeout",
        "30",
        "--output-truncate",
        "true",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=600)
    text = out.decode(errors="replace")
    print(text[-3000:])  # the summary: operations, phases, test cases
    pipeline.assert_alive()
    assert proc.returncode == 0, f"{text[-12000:]}\n{pipeline.log_tail()}"
