"""SIGKILL the worker process in the middle of a batch, restart it: every request ends with
exactly one committed response (read_committed), none lost, none doubled."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from infra.settings import Settings
from schemas import TokenChunk
from tests.helpers import read_events, spawn, wait_for
from tests.integration.inference_support import answered, enriched, feed, responses

pytest.importorskip("llama_cpp")


async def _streaming(settings: Settings) -> bool:
    """True once the worker is generating (TokenChunks are published as tokens arrive)."""
    return bool(await read_events(settings, settings.topics.tokens, TokenChunk, timeout=5))


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


async def test_sigkill_mid_batch_then_restart_answers_each_request_once(
    settings: Settings, tmp_path: Path
) -> None:
    events = [
        enriched(f"Tell me a short story about the number {i}.", max_tokens=48, stream=True, lane=lane)
        for i, lane in enumerate(["chat", "bulk"] * 8)
    ]
    await feed(settings, events)
    ids = {e.request_id for e in events}
    env = {"RAGBUS_LLM_MAX_BATCH": "8", "RAGBUS_LLM_CONTEXT_WINDOW": "2048", "RAGBUS_LLM_MAX_WAIT_MS": "50"}
    log = tmp_path / "worker.log"

    first = spawn(["worker", "run"], settings, log, **env)
    try:
        await wait_for(lambda: _streaming(settings), timeout=120, what="the first batch to generate")
        before = {r.request_id for _, r in await responses(settings)}
        assert len(before) < len(ids), "the kill must land before the work is done"
    finally:
        _kill(first)

    second = spawn(["worker", "run"], settings, log, **env)
    try:
        got = await wait_for(lambda: answered(settings, ids), timeout=300, what="every answer after restart")
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            second.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _kill(second)

    final = await responses(settings)
    counts: dict[str, int] = {}
    for _, r in final:
        counts[r.request_id] = counts.get(r.request_id, 0) + 1
    assert counts == {i: 1 for i in ids}, log.read_text()[-3000:]
    assert all(v[0].ok and v[0].answer for v in got.values())
    # The killed batch was streamed: its tokens were sent, yet its responses were never committed.
    killed_tokens = {t.request_id for t in await read_events(settings, settings.topics.tokens, TokenChunk)}
    assert killed_tokens - before
