"""Kafka record batches with header keys that are not UTF-8: records a non-Python producer (kcat,
librdkafka, Java with a byte-level serializer) can put on a topic and aiokafka's API cannot.

aiokafka's pure-Python batch builder writes a header key as `key.encode("utf-8")`, so a `str`
whose `encode` returns raw bytes writes those bytes, inside a batch with a correct CRC."""

from __future__ import annotations

from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy


class RawHeaderKey(str):
    """A header key carrying bytes that are not UTF-8."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawHeaderKey:
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


def record_batch(records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]) -> bytes:
    """One uncompressed, non-transactional batch of (key, value, headers) records."""
    builder = _DefaultRecordBatchBuilderPy(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for offset, (key, value, headers) in enumerate(records):
        builder.append(offset, timestamp=1000, key=key, value=value, headers=headers)
    return bytes(builder.build())
