"""Records the Kafka client itself cannot read become `unreadable` records instead of a poll loop
that raises forever.

Measured with aiokafka 0.14.0 (its C record parser): a record whose header key is not UTF-8 —
any producer can write one, e.g. kcat with `-H $'\\xff=v'` — makes every `getmany()` raise
`UnicodeDecodeError` for that partition, and the records before it in the same fetch are skipped
without being returned. One such record would stop its partition for every consumer (the
processors, the worker, the audit sink, faust's agents) and crash-loop them on restart.

`install()` (called by `infra.kafka.clients`, which builds every client) replaces aiokafka's per-
fetch record iterator (`aiokafka.consumer.fetcher.PartitionRecords`, looked up by the fetcher at
each fetch) with a subclass that turns such a failure into one ConsumerRecord at the offset it
could not read: no key, no value, and the header `UNREADABLE_HEADER` carrying the client's error.
The position moves past it, so the partition goes on; decoding then raises
`DecodeError("unreadable", ...)`, which dead-letters it with its coordinates like any bad record.
Records after it in the same batch cannot be parsed by the client either (the batch is read again
from the next offset), so each of them is reported the same way: still on the DLQ by coordinates,
with its bytes left on the broker for another client to read.

This patches a library internal, on purpose and in one place: aiokafka is pinned, and
tests/unit/test_unreadable.py fails should the fetcher stop using the class looked up here.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import errors as kafka_errors
from aiokafka.consumer import fetcher as _fetcher
from aiokafka.structs import ConsumerRecord

from schemas.headers import UNREADABLE_HEADER

log = logging.getLogger(__name__)

_original = _fetcher.PartitionRecords


class GuardedPartitionRecords(_original):  # type: ignore[misc, valid-type]
    """aiokafka's PartitionRecords, except that a record it cannot parse becomes an unreadable
    record at the first offset not yet returned, and iteration stops there."""

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except StopIteration:
            raise
        except kafka_errors.KafkaError:
            raise  # the client's own errors (e.g. a bad CRC: the batch is fetched again)
        except Exception as error:  # noqa: BLE001 - what the parser could not read
            return self._unreadable(error)

    def _unreadable(self, error: BaseException) -> ConsumerRecord[Any, Any]:
        tp = self._tp
        offset = self.next_fetch_offset
        self.next_fetch_offset = offset + 1
        self._records_iterator = iter(())  # the rest is fetched again from offset + 1
        reason = f"{type(error).__name__}: {error}"[:500]
        log.warning("%s/%d@%d cannot be read by the Kafka client: %s", tp.topic, tp.partition, offset, reason)
        return ConsumerRecord(
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            timestamp=-1,
            timestamp_type=0,
            key=None,
            value=None,
            checksum=None,
            serialized_key_size=-1,
            serialized_value_size=-1,
            headers=[(UNREADABLE_HEADER, reason.encode())],
        )


def install() -> None:
    """Use the guarded iterator for every consumer of this process (idempotent)."""
    _fetcher.PartitionRecords = GuardedPartitionRecords  # type: ignore[misc]
