"""A record the Kafka client cannot parse becomes an `unreadable` record, not a poll loop that
raises forever (infra.kafka.unreadable)."""

from __future__ import annotations

import inspect

import pytest
from aiokafka import TopicPartition
from aiokafka.consumer import fetcher
from aiokafka.record.memory_records import MemoryRecords

import infra.kafka.clients  # noqa: F401 - installs the guard, as every component does
from infra.kafka.codec import DecodeError, decode
from infra.kafka.unreadable import GuardedPartitionRecords
from schemas import ChatRequest
from schemas.headers import UNREADABLE_HEADER
from tests.record_batches import RawHeaderKey, record_batch

READ_UNCOMMITTED = 0
TP = TopicPartition("ragbus.chat.requests", 0)


def _batch(poisoned: int, count: int = 4, base: int = 0) -> bytes:
    """One record batch whose record `poisoned` has a header key that is not UTF-8."""
    bad = RawHeaderKey(b"\xff\xfe\xfd\xfc")
    return record_batch(
        [(None, f"v{base + i}".encode(), [(bad if i == poisoned else "ok", b"x")]) for i in range(count)]
    )


def _read(buf: bytes, fetch_offset: int) -> list[object]:
    records = fetcher.PartitionRecords(
        TP, MemoryRecords(buf), [], fetch_offset, None, None, False, READ_UNCOMMITTED
    )
    return list(records)


def test_the_fetcher_builds_the_guarded_iterator() -> None:
    assert fetcher.PartitionRecords is GuardedPartitionRecords
    # The fetcher looks the class up at each fetch; were that to change, the guard would be void.
    assert "PartitionRecords(" in inspect.getsource(fetcher.Fetcher)


def test_the_plain_client_raises_on_such_a_record() -> None:
    plain = GuardedPartitionRecords.__mro__[1](
        TP, MemoryRecords(_batch(1)), [], 0, None, None, False, READ_UNCOMMITTED
    )
    with pytest.raises(UnicodeDecodeError):
        list(plain)


def test_an_unparsable_record_becomes_an_unreadable_one_and_the_partition_moves_on() -> None:
    buf = _batch(poisoned=1)
    first = _read(buf, 0)
    assert [r.offset for r in first] == [0, 1]  # type: ignore[attr-defined]
    good, bad = first
    assert good.value == b"v0"  # type: ignore[attr-defined]
    assert bad.value is None and bad.headers[0][0] == UNREADABLE_HEADER  # type: ignore[attr-defined]
    # The consumer fetches again from offset 2: the client cannot parse past the bad record in
    # this batch, so each later record of it is reported by coordinates too; none is skipped.
    offsets = []
    next_offset = 2
    while next_offset < 4:
        (record,) = _read(buf, next_offset)
        offsets.append(record.offset)  # type: ignore[attr-defined]
        next_offset = record.offset + 1  # type: ignore[attr-defined]
    assert offsets == [2, 3]


def test_decoding_an_unreadable_record_names_it() -> None:
    (_, bad) = _read(_batch(poisoned=1), 0)
    with pytest.raises(DecodeError) as info:
        decode(bad.value, ChatRequest, max_bytes=1 << 20, headers=bad.headers)  # type: ignore[attr-defined]
    assert info.value.error_class == "unreadable"
    assert "UnicodeDecodeError" in info.value.message
