"""A transaction that never ends must not hang a component: the publisher gives up after
`commit_timeout_s`, fails with an error that says what to do, and the component stops (to restart
from the committed offsets). Even when unwinding the stuck transaction hangs as well."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from infra.kafka import publisher as publisher_module
from infra.kafka.publisher import PublishError, TransactionalPublisher
from infra.settings import Settings
from processors.records import RecordView


class StuckProducer:
    """A transactional producer whose broker stopped answering: sends never complete, and a
    cancelled send takes a long time to unwind (what asyncio.wait_for would wait out)."""

    def __init__(self) -> None:
        self.sends = 0
        self.stopped = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.stopped = True

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    async def send(self, *args: Any, **kwargs: Any) -> None:
        self.sends += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(3)  # the unwinding is stuck too
            raise

    async def send_offsets_to_transaction(self, *args: Any) -> None:
        return None


def record(offset: int) -> RecordView:
    return RecordView(
        topic="t.chat.requests",
        partition=0,
        offset=offset,
        timestamp=0,
        key=None,
        value=b"{}",
        headers=[],
        generation=None,
    )


async def test_a_stuck_commit_fails_the_publisher_within_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    producer = StuckProducer()
    monkeypatch.setattr(publisher_module, "make_producer", lambda *a, **kw: producer)
    settings = Settings(kafka_bootstrap="127.0.0.1:1", _env_file=None)  # type: ignore[call-arg]
    pub = TransactionalPublisher(
        settings, group_id="g", transactional_id="stuck", client_id="test", commit_timeout_s=0.3
    )
    await pub.start()
    started = time.monotonic()
    done = pub.submit([(record(5), [("t.chat.enriched", _Encoded())])])
    with pytest.raises(
        PublishError, match=r"did not commit within 0.3 s.*restart resumes from the committed"
    ):
        await asyncio.wait_for(done, 2.5)
    assert time.monotonic() - started < 2.0, "the publisher waited for the stuck transaction to unwind"
    assert producer.sends == 1
    assert pub.failed is not None and pub.failed.done()
    with pytest.raises(PublishError):  # what the components watch to stop
        pub.failed.result()
    later = pub.submit([(record(6), [])])
    with pytest.raises(PublishError):
        await later
    await asyncio.wait_for(pub.stop(), 2.0)
    assert producer.stopped


def test_the_deadline_defaults_to_the_setting() -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:1", kafka_commit_timeout_s=7, _env_file=None)  # type: ignore[call-arg]
    pub = TransactionalPublisher(settings, group_id="g", transactional_id="x", client_id="test")
    assert pub.commit_timeout_s == 7


class _Encoded:
    key = b"k"
    value = b"{}"
    headers: list[tuple[str, bytes]] = []
