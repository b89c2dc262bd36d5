"""What the publisher refuses to commit: results a rebalance overtook (revoked partition, older
group generation) and records already committed — each would duplicate outputs downstream."""

from __future__ import annotations

from aiokafka import TopicPartition

from infra.kafka.publisher import TransactionalPublisher
from infra.settings import Settings
from processors.records import RecordView


def record(partition: int = 0, offset: int = 10, generation: int | None = 3) -> RecordView:
    return RecordView(
        topic="t.chat.requests",
        partition=partition,
        offset=offset,
        timestamp=0,
        key=None,
        value=b"{}",
        headers=[],
        generation=generation,
    )


def publisher() -> TransactionalPublisher:
    settings = Settings(kafka_bootstrap="127.0.0.1:1", _env_file=None)  # type: ignore[call-arg]
    return TransactionalPublisher(settings, group_id="g", transactional_id="x", client_id="test")


def test_a_current_record_may_be_committed() -> None:
    assert publisher().stale_reason(record(), 3) is None


async def test_records_of_a_revoked_partition_wait_for_their_next_owner() -> None:
    pub = publisher()
    await pub.on_partitions_revoked({TopicPartition("t.chat.requests", 0)})
    assert pub.stale_reason(record(partition=0), 3) == "partition revoked"
    assert pub.stale_reason(record(partition=1), 3) is None
    pub.on_partitions_assigned({TopicPartition("t.chat.requests", 0)})
    assert pub.stale_reason(record(partition=0), 3) is None


def test_records_fetched_in_an_older_generation_are_not_committed() -> None:
    pub = publisher()
    reason = pub.stale_reason(record(generation=2), 3)
    assert reason is not None and "generation 2" in reason
    assert pub.stale_reason(record(generation=None), 3) is None  # unknown: nothing to compare


def test_records_below_the_committed_offset_are_not_committed_twice() -> None:
    pub = publisher()
    pub.note_committed({TopicPartition("t.chat.requests", 0): 11})
    assert pub.stale_reason(record(offset=10), 3) == "already committed"
    assert pub.stale_reason(record(offset=11), 3) is None
