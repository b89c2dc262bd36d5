"""A consumed Kafka record as the processors see it, whichever client read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition

from schemas.topics import tenant_of


@dataclass(frozen=True)
class RecordView:
    """Coordinates and bytes of one consumed record (what the codec and the DLQ need)."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # milliseconds since the epoch, as Kafka stores it
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    #: time.monotonic() when this process received the record (0: unknown).
    received: float = 0.0
    #: Consumer-group generation the record was fetched in (None: unknown).
    generation: int | None = None

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def tenant(self, prefix: str) -> str:
        """The tenant that sent this record: the owner of its topic (only that tenant's principal
        may write there), whatever the payload says. Raises ValueError for a non-tenant topic."""
        tenant = tenant_of(self.topic, prefix)
        if tenant is None:
            raise ValueError(f"{self.topic} is not a tenant topic under {prefix}")
        return tenant

    @property
    def key_text(self) -> str | None:
        return self.key.decode("utf-8", "replace") if self.key is not None else None

    @classmethod
    def from_faust(cls, message: Any) -> RecordView:
        """From a faust `Message` (its timestamp is in seconds; `time_in` is monotonic)."""
        headers = message.headers or []
        if isinstance(headers, dict):
            headers = list(headers.items())
        return cls(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            timestamp=round((message.timestamp or 0) * 1000),
            key=message.key,
            value=message.value,
            headers=[(k, v) for k, v in headers],
            received=float(message.time_in or 0.0),
            generation=getattr(message, "generation_id", None),
        )
