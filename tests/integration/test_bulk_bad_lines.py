"""A bulk job over hostile input, against the session's broker: every bad line becomes an error
line in the output (counted in the job's errors), and the good lines after them are still sent.

No pipeline runs, so the good lines get no answer; once they are on the requests topic the job
is cancelled, which is how a user would stop it too."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from infra.kafka.topics import declare_topics
from infra.secrets import as_tenant
from infra.settings import Settings
from producers.bulk.formats import CUSTOM_ID_MAX, field_max_length, safe_custom_id
from producers.bulk.runner import BulkRunner
from producers.bulk.state import JobState, JobStore
from schemas import ChatRequest
from tests.helpers import read_events, wait_for


def _line(custom_id: object, content: object = "q", **body: object) -> str:
    return json.dumps(
        {"custom_id": custom_id, "body": {"messages": [{"role": "user", "content": content}], **body}}
    )


async def test_bad_lines_become_error_lines_and_the_job_goes_on(
    base_settings: Settings, tmp_path: Path
) -> None:
    await declare_topics(base_settings, tenants=["acme"])
    settings = as_tenant(base_settings, "acme")
    long_id = "L" * (CUSTOM_ID_MAX + 100)
    bad = [
        _line("part", [{"type": "text", "text": 5}]),
        _line("too-long", "q" * (field_max_length(ChatRequest, "question") + 1)),
        _line(long_id),
        "{invalid json",
        json.dumps({"custom_id": "no-body"}),
        _line("bad-sampling", max_tokens="lots"),
        _line("crlf\r\nid"),
    ]
    good = [_line("good-1"), _line("good-2")]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(bad[:4] + good[:1] + bad[4:] + good[1:]) + "\n")
    out = tmp_path / "out.jsonl"
    store = JobStore(settings.home, "acme")
    state = JobState(
        job_id="hostile",
        input=str(path),
        output=str(out),
        input_format="openai",
        tenant_id="acme",
        user_id="u",
        total=len(bad) + len(good),
    )
    runner = BulkRunner(settings, state, store, progress=False)
    job = asyncio.create_task(runner.run())
    topic = settings.topics.tenant("acme").requests("bulk")

    async def both_sent() -> list[str]:
        sent = {r.custom_id for r in await read_events(settings, topic, ChatRequest)}
        return sorted(sent) if {"good-1", "good-2"} <= sent else []

    try:
        assert await wait_for(both_sent, timeout=60, what="the good lines on the requests topic") == [
            "good-1",
            "good-2",
        ]
    finally:
        store.request_cancel(state.job_id)
        final = await asyncio.wait_for(job, 60)

    assert final.status == "cancelled"
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(bad) and final.errors == len(bad)
    assert all(x["response"] is None and x["error"]["code"] == "invalid_request" for x in lines)
    ids = {x["custom_id"] for x in lines}
    assert {"part", "too-long", "line-4", "no-body", "bad-sampling", "crlf\r\nid"} <= ids
    assert safe_custom_id(long_id) in ids and all(len(i) <= CUSTOM_ID_MAX for i in ids)
