"""Cancellation's pure logic: the bounded, expiring cancel table; what the worker's reader accepts
from a cancel topic (and dead-letters); the cancelled answer's shape; the vLLM engine's abort on a
stand-in engine; the producer side's events. The real broker, gateway and model are in
tests/integration/test_cancellation.py."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import ValidationError

from inference_workers.cancels import CancelRegistry
from inference_workers.engines.base import Generation
from inference_workers.engines.vllm import VllmEngine
from inference_workers.worker import respond
from inference_workers.worker.cancel_reader import CancelReader
from infra.kafka.codec import encode
from infra.settings import Settings
from producers.cancel import cancel_events
from schemas import CancelRequest, ChatRequest, ChatResponse, EnrichedRequest, ErrorCode, Topics, limits

PREFIX = "ragbus"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the cancel table -----------------------------------------------------------------------------
def test_a_cancel_is_held_per_tenant_until_it_expires() -> None:
    clock = Clock()
    reg = CancelRegistry(limit=10, ttl_s=60, clock=clock)
    assert reg.add("acme", "r1", "client_disconnected")
    assert reg.reason("acme", "r1") == "client_disconnected"
    assert reg.cancelled("acme", "r1") and reg.check("acme", "r1")()
    # Another tenant's request with the same id is not cancelled by acme's cancel.
    assert not reg.cancelled("globex", "r1")
    assert not reg.cancelled("acme", "r2")
    clock.now += 59
    assert reg.cancelled("acme", "r1")
    clock.now += 1
    assert not reg.cancelled("acme", "r1") and len(reg) == 0
    assert reg.stats.expired == 1


def test_a_cancel_expires_from_when_it_was_published() -> None:
    clock = Clock()
    reg = CancelRegistry(limit=10, ttl_s=60, clock=clock)
    assert not reg.add("acme", "old", "x", published_s=clock.now - 61)  # read back, already expired
    assert reg.add("acme", "recent", "x", published_s=clock.now - 50)
    assert reg.add("acme", "future", "x", published_s=clock.now + 10_000)  # a lying clock: now
    clock.now += 11
    assert not reg.cancelled("acme", "recent")
    assert reg.cancelled("acme", "future")


def test_the_table_is_bounded_and_forgets_the_oldest() -> None:
    clock = Clock()
    reg = CancelRegistry(limit=3, ttl_s=60, clock=clock)
    for i in range(5):
        clock.now += 1
        reg.add("acme", f"r{i}", "x")
    assert len(reg) == 3 and reg.stats.evicted == 2
    assert [reg.cancelled("acme", f"r{i}") for i in range(5)] == [False, False, True, True, True]


def test_out_of_order_cancels_expire_in_time_order() -> None:
    clock = Clock()
    reg = CancelRegistry(limit=100, ttl_s=60, clock=clock)
    reg.add("acme", "late", "x", published_s=clock.now)
    reg.add("acme", "early", "x", published_s=clock.now - 30)  # an older record read after
    clock.now += 31
    assert not reg.cancelled("acme", "early")
    assert reg.cancelled("acme", "late")
    # Far out of order (beyond the short walk): still exact.
    for i in range(100):
        reg.add("acme", f"n{i}", "x", published_s=clock.now)
    reg.add("acme", "older", "x", published_s=clock.now - 50)
    clock.now += 11
    assert not reg.cancelled("acme", "older") and reg.cancelled("acme", "n0")


def test_a_repeated_cancel_keeps_the_later_expiry() -> None:
    clock = Clock()
    reg = CancelRegistry(limit=10, ttl_s=60, clock=clock)
    reg.add("acme", "r", "x")
    clock.now += 30
    reg.add("acme", "r", "y", published_s=clock.now - 40)
    clock.now += 29
    assert reg.reason("acme", "r") == "y" and len(reg) == 1


def test_the_default_bounds_come_from_the_contract() -> None:
    reg = CancelRegistry()
    assert reg.limit == limits.CANCELS_PENDING_MAX and reg.ttl_s == limits.CANCEL_TTL_S
    with pytest.raises(ValueError):
        CancelRegistry(limit=0)


# --- the worker's reader --------------------------------------------------------------------------
@dataclass
class Record:
    topic: str
    value: bytes | None
    offset: int = 0
    partition: int = 0
    key: bytes | None = b"k"
    headers: list[Any] = field(default_factory=list)
    timestamp: int = 0


def _reader(clock: Clock) -> tuple[CancelReader, CancelRegistry]:
    settings = Settings(topic_prefix=PREFIX, _env_file=None)  # type: ignore[call-arg]
    registry = CancelRegistry(limit=10, ttl_s=60, clock=clock)

    async def dead_letter(_: list[Any]) -> None:
        return None

    reader = CancelReader(
        settings,
        registry,
        None,
        stage="t",
        dead_letter=dead_letter,
        on_duty=lambda: True,  # type: ignore[arg-type]
    )
    return reader, registry


def _cancel_record(tenant: str, request_id: str, *, on: str | None = None, ts_s: float = 0) -> Record:
    enc = encode(CancelRequest(tenant_id=tenant, request_id=request_id, reason="client_disconnected"))
    topic = on or Topics(PREFIX).tenant(tenant).cancel
    return Record(topic, enc.value, headers=enc.headers, timestamp=int(ts_s * 1000))


def test_the_reader_holds_valid_cancels_under_the_topics_tenant() -> None:
    clock = Clock()
    reader, reg = _reader(clock)
    assert reader.apply(_cancel_record("acme", "r1", ts_s=clock.now - 10)) is None
    assert reg.reason("acme", "r1") == "client_disconnected"
    clock.now += 51
    assert not reg.cancelled("acme", "r1")  # expiry counts from the broker's time


@pytest.mark.parametrize(
    ("value", "error_class"),
    [
        (None, "empty"),
        (b"not json", "not_json"),
        (b"[1]", "not_json"),
        (b'{"tenant_id": "acme", "request_id": "r", "surprise": 1}', "schema_validation"),
        (json.dumps({"tenant_id": "acme", "request_id": "r" * 129}).encode(), "schema_validation"),
        (
            json.dumps({"tenant_id": "acme", "request_id": "r", "reason": "x" * 257}).encode(),
            "schema_validation",
        ),
        (b"{" + b" " * limits.CANCEL_EVENT_BYTES_MAX + b"}", "too_large"),
        (b"\xff\xfe", "invalid_utf8"),
    ],
)
def test_the_reader_refuses_malformed_cancels(value: bytes | None, error_class: str) -> None:
    reader, reg = _reader(Clock())
    error = reader.apply(Record(Topics(PREFIX).tenant("acme").cancel, value))
    assert error is not None and error.error_class == error_class
    assert len(reg) == 0


def test_a_cancel_for_another_tenant_is_refused() -> None:
    reader, reg = _reader(Clock())
    forged = _cancel_record("globex", "r1", on=Topics(PREFIX).tenant("acme").cancel)
    error = reader.apply(forged)
    assert error is not None and error.error_class == "tenant_mismatch"
    assert not reg.cancelled("globex", "r1") and not reg.cancelled("acme", "r1")


def test_a_cancel_on_a_foreign_topic_is_refused() -> None:
    reader, reg = _reader(Clock())
    error = reader.apply(_cancel_record("acme", "r1", on="other.t.acme.chat.cancel"))
    assert error is not None and len(reg) == 0


async def test_only_records_after_start_are_dead_lettered_and_only_on_duty() -> None:
    from aiokafka import TopicPartition

    clock = Clock()
    reader, reg = _reader(clock)
    letters: list[Any] = []

    async def dead_letter(outs: list[Any]) -> None:
        letters.extend(outs)

    reader.dead_letter = dead_letter
    topic = Topics(PREFIX).tenant("acme").cancel
    tp = TopicPartition(topic, 0)
    good = _cancel_record("acme", "ok", ts_s=clock.now)
    good.offset = 5
    records = [Record(topic, b"old junk", offset=1), Record(topic, b"new junk", offset=3), good]

    class Consumer:
        async def getmany(self, timeout_ms: int) -> dict[TopicPartition, list[Record]]:
            return {tp: records}

    reader._consumer = Consumer()  # type: ignore[assignment]  # noqa: SLF001 - a stand-in consumer
    reader._live_from[tp] = 2  # noqa: SLF001 - as if it had started with records 0-1 present
    assert await reader.poll_once() == 3
    assert reg.cancelled("acme", "ok")
    assert [out[0] for out in letters] == ["ragbus.chat.cancel.dlq"]
    letter = json.loads(letters[0][1].value)
    assert letter["source_offset"] == 3 and letter["error_class"] == "not_json"
    letters.clear()
    reader.on_duty = lambda: False
    assert await reader.poll_once() == 3 and letters == []


# --- the answer -----------------------------------------------------------------------------------
def _enriched() -> EnrichedRequest:
    req = ChatRequest(tenant_id="acme", question="q", job_id="j", custom_id="c")
    return EnrichedRequest(**req.envelope(), request=req)


def test_a_cancelled_answer_is_an_error_that_keeps_what_was_generated() -> None:
    ev = _enriched()
    topic, enc = respond.cancelled(
        ev,
        topics=Topics(PREFIX),
        reason="client_disconnected",
        model="smol",
        text="The sky is",
        prompt_tokens=20,
        completion_tokens=3,
    )
    assert topic == "ragbus.t.acme.chat.responses"
    r = ChatResponse.model_validate_json(enc.value)
    assert r.request_id == ev.request_id and r.job_id == "j" and r.custom_id == "c"
    assert r.finish_reason == "error" and r.error is not None and r.error.code == ErrorCode.CANCELLED
    assert "client_disconnected" in r.error.message and "after 3 generated tokens" in r.error.message
    assert r.answer == "The sky is" and r.usage.total_tokens == 23 and not r.ok
    skipped = ChatResponse.model_validate_json(
        respond.cancelled(ev, topics=Topics(PREFIX), reason="batch_cancelled")[1].value
    )
    assert "before it was generated" in skipped.error.message and skipped.usage.total_tokens == 0  # type: ignore[union-attr]


# --- vLLM's abort ---------------------------------------------------------------------------------
class _Out:
    def __init__(self, text: str, finish: str | None = None) -> None:
        self.index, self.text, self.token_ids, self.finish_reason, self.logprobs = 0, text, [1], finish, None


class _RequestOutput:
    def __init__(self, text: str, finish: str | None = None) -> None:
        self.prompt_token_ids = [1, 2, 3]
        self.outputs = [_Out(text, finish)]


class _FakeVllm:
    """AsyncLLM's generate/abort: a token every 10 ms until aborted (or 100 tokens)."""

    def __init__(self) -> None:
        self.aborted: list[str] = []

    async def generate(self, prompt: Any, params: Any, request_id: str) -> Any:
        for i in range(100):
            if request_id in self.aborted:
                return
            await asyncio.sleep(0.01)
            yield _RequestOutput(f"t{i} ", "length" if i == 99 else None)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


async def test_vllm_aborts_a_cancelled_request_and_keeps_its_text() -> None:
    engine = _FakeVllm()
    vllm = VllmEngine("m", "m")
    vllm._engine = engine  # noqa: SLF001 - a stand-in AsyncLLM
    flag = {"stop": False}
    got: list[str] = []

    async def consume(request_id: str) -> None:
        async for out in engine.generate(None, None, request_id):
            got.append(out.outputs[0].text)
            if len(got) == 5:
                flag["stop"] = True

    assert await vllm.until_cancelled(consume("r-1"), lambda: flag["stop"], "r-1") is True
    assert engine.aborted == ["r-1"] and 5 <= len(got) < 100

    got.clear()
    assert await vllm.until_cancelled(consume("r-2"), lambda: False, "r-2") is False
    assert len(got) == 100 and engine.aborted == ["r-1"]


def test_a_generation_without_a_cancel_check_is_never_cancelled() -> None:
    from inference_workers.engines.vllm import _finish

    assert _finish("length", False) == "length" and _finish(None, False) == "stop"
    assert _finish("stop", True) == "cancelled" and _finish("abort", False) == "cancelled"
    g = Generation("p", ChatRequest(tenant_id="a", question="q").sampling, prompt_ids=[1])
    assert g.cancelled is None


# --- the producer side ----------------------------------------------------------------------------
def test_cancel_events_are_validated_and_deduplicated() -> None:
    events = cancel_events("acme", ["a", "b", "a"], reason="batch_cancelled")
    assert [e.request_id for e in events] == ["a", "b"]
    assert all(e.tenant_id == "acme" and e.reason == "batch_cancelled" for e in events)
    with pytest.raises(ValidationError):
        cancel_events("acme", ["x" * (limits.REQUEST_ID_MAX + 1)], reason="r")
    with pytest.raises(ValidationError):
        cancel_events("acme", [""], reason="r")
    assert Topics(PREFIX).tenant("acme").cancel == "ragbus.t.acme.chat.cancel"
