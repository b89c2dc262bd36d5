"""The declared ragbus topics: names, the event each carries, and their Kafka settings.

Topic names are `<prefix>.<suffix>`; the prefix is `ragbus` unless a deployment (or a test)
sets another, so several isolated ragbus instances can share one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.base import EventBase, Lane
from schemas.events import (
    ChatRequest,
    ChatResponse,
    DeadLetter,
    DocumentIngest,
    EnrichedRequest,
    IngestResult,
    TokenChunk,
)

DEFAULT_PREFIX = "ragbus"
DLQ_SUFFIX = ".dlq"

#: Every ragbus topic stamps records with the broker's clock (see `TopicSpec.configs`).
TIMESTAMP_TYPE = "LogAppendTime"

DAY_MS = 24 * 3600 * 1000
MIB = 1024 * 1024


@dataclass(frozen=True)
class TopicSpec:
    """One declared topic. `suffix` is the name without the prefix, e.g. `chat.requests`."""

    suffix: str
    event: type[EventBase]
    partitions: int = 6
    retention_ms: int = 7 * DAY_MS
    cleanup_policy: str = "delete"
    #: What the broker accepts (topic `max.message.bytes`).
    max_message_bytes: int = 8 * MIB
    #: What consumers accept; a larger event goes to the DLQ as `too_large`.
    max_event_bytes: int = 1 * MIB
    has_dlq: bool = False

    def name(self, prefix: str = DEFAULT_PREFIX) -> str:
        return f"{prefix}.{self.suffix}"

    def configs(self) -> dict[str, str]:
        """The topic-level configs `declare_topics` sets, on creation and on existing topics."""
        return {
            "retention.ms": str(self.retention_ms),
            "cleanup.policy": self.cleanup_policy,
            "max.message.bytes": str(self.max_message_bytes),
            # Records carry the broker's append time, not a time the producer chose: a producer's
            # clock (or a hostile one stamping 1970 or 2999) must not decide where a record sits in
            # time-based retention, in queue-time measurements or in the audit log's months.
            "message.timestamp.type": TIMESTAMP_TYPE,
        }


def _dlq(spec: TopicSpec) -> TopicSpec:
    # A dead letter carries the original bytes plus base64 overhead (4/3) and context.
    return TopicSpec(
        suffix=spec.suffix + DLQ_SUFFIX,
        event=DeadLetter,
        partitions=1,
        retention_ms=30 * DAY_MS,
        max_message_bytes=spec.max_message_bytes * 2 + MIB,
        max_event_bytes=spec.max_message_bytes * 2 + MIB,
    )


_INPUTS = (
    TopicSpec("chat.requests", ChatRequest, has_dlq=True),
    TopicSpec("chat.enriched", EnrichedRequest, max_event_bytes=4 * MIB, has_dlq=True),
    TopicSpec("chat.responses", ChatResponse),
    TopicSpec("chat.tokens", TokenChunk, retention_ms=DAY_MS),
    TopicSpec("bulk.requests", ChatRequest, has_dlq=True),
    TopicSpec("bulk.enriched", EnrichedRequest, max_event_bytes=4 * MIB, has_dlq=True),
    TopicSpec("bulk.responses", ChatResponse, retention_ms=14 * DAY_MS),
    TopicSpec(
        "docs.ingest", DocumentIngest, max_message_bytes=24 * MIB, max_event_bytes=16 * MIB, has_dlq=True
    ),
    TopicSpec("docs.ingested", IngestResult),
)

#: Every declared topic, DLQs included, in declaration order.
TOPICS: tuple[TopicSpec, ...] = tuple(
    t for spec in _INPUTS for t in ((spec, _dlq(spec)) if spec.has_dlq else (spec,))
)

_BY_SUFFIX = {t.suffix: t for t in TOPICS}


def spec(suffix: str) -> TopicSpec:
    return _BY_SUFFIX[suffix]


def topic_names(prefix: str = DEFAULT_PREFIX) -> list[str]:
    return [t.name(prefix) for t in TOPICS]


def dlq_name(topic: str) -> str:
    return topic + DLQ_SUFFIX


def spec_for_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> TopicSpec | None:
    """The spec of a full topic name, or None when the topic is not a declared ragbus topic."""
    head = prefix + "."
    return _BY_SUFFIX.get(topic[len(head) :]) if topic.startswith(head) else None


#: What consumers accept, and what a dead letter echoes, from a topic ragbus did not declare
#: (e.g. one a pattern subscription picks up).
UNDECLARED_MAX_BYTES = 1 * MIB


def max_event_bytes(topic: str, prefix: str = DEFAULT_PREFIX) -> int:
    """The largest event a consumer of `topic` decodes (its spec's `max_event_bytes`)."""
    found = spec_for_topic(topic, prefix)
    return found.max_event_bytes if found is not None else UNDECLARED_MAX_BYTES


def max_message_bytes(topic: str, prefix: str = DEFAULT_PREFIX) -> int:
    """What the broker accepts on `topic` (its spec's `max_message_bytes`)."""
    found = spec_for_topic(topic, prefix)
    return found.max_message_bytes if found is not None else UNDECLARED_MAX_BYTES


class Topics:
    """Full topic names under one prefix: `Topics("ragbus").requests("chat")`."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix

    def _n(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def requests(self, lane: Lane) -> str:
        return self._n(f"{lane}.requests")

    def enriched(self, lane: Lane) -> str:
        return self._n(f"{lane}.enriched")

    def responses(self, lane: Lane) -> str:
        return self._n(f"{lane}.responses")

    @property
    def tokens(self) -> str:
        return self._n("chat.tokens")

    @property
    def docs_ingest(self) -> str:
        return self._n("docs.ingest")

    @property
    def docs_ingested(self) -> str:
        return self._n("docs.ingested")

    def dlq(self, topic: str) -> str:
        return dlq_name(topic)

    def all(self) -> list[str]:
        return topic_names(self.prefix)

    @property
    def pattern(self) -> str:
        """Regex matching every topic under the prefix, DLQs and undeclared ones included (for
        pattern subscriptions), except another deployment's whose prefix extends this one: with
        prefix `ragbus`, `ragbus.models.updates` matches, `ragbus.staging.chat.requests` does not."""
        return "^" + self.prefix.replace(".", r"\.") + r"\.(?!.+\.(chat|bulk|docs)\.).+"
