"""The declared ragbus topics: names, the event each carries, and their Kafka settings.

Two kinds of topic:

- **tenant topics**, `<prefix>.t.<tenant>.<suffix>`: each tenant's own requests in
  (`chat.requests`, `bulk.requests`, `docs.ingest`, and `chat.cancel` to cancel them) and replies
  out (`chat.responses`, `chat.tokens`, `bulk.responses`, `docs.ingested`). The broker's ACLs let
  a tenant's principal write only its own request topics and read only its own reply topics
  (`schemas.tenants`), so the tenant of a record is the topic it came from, never what its
  payload claims;
- **internal topics**, `<prefix>.<suffix>`: the retrieved context (`*.enriched`) and the dead
  letters (one DLQ per input suffix, shared by every tenant), read and written only by ragbus's
  own components.

The prefix is `ragbus` unless a deployment (or a test) sets another, so several isolated ragbus
instances can share one cluster; a prefix must not contain `.t.`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from schemas import limits
from schemas.base import EventBase, Lane
from schemas.events import (
    CancelRequest,
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
#: The name segment that opens a tenant's topics: `<prefix>.t.<tenant>.<suffix>`.
TENANT_SEGMENT = "t"
_TENANT_RE = re.compile(limits.TENANT_ID_PATTERN)


def check_tenant(tenant: str) -> str:
    """`tenant` when it is a valid tenant name (it becomes part of topic and principal names)."""
    if not (0 < len(tenant) <= limits.TENANT_ID_MAX and _TENANT_RE.match(tenant)):
        raise ValueError(
            f"invalid tenant name {tenant[:80]!r}: use 1-{limits.TENANT_ID_MAX} letters, digits, "
            "'_' or '-', starting with a letter or digit"
        )
    return tenant


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
    #: One topic per tenant (`<prefix>.t.<tenant>.<suffix>`) instead of one shared topic.
    per_tenant: bool = False

    def name(self, prefix: str = DEFAULT_PREFIX, tenant: str | None = None) -> str:
        """The full name; a per-tenant topic needs its tenant, a shared one takes none."""
        if self.per_tenant != (tenant is not None):
            need = "needs a tenant" if self.per_tenant else "is shared by all tenants"
            raise ValueError(f"topic {self.suffix} {need}")
        if tenant is None:
            return f"{prefix}.{self.suffix}"
        return f"{prefix}.{TENANT_SEGMENT}.{check_tenant(tenant)}.{self.suffix}"

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
    # A dead letter carries the original bytes plus base64 overhead (4/3) and context. DLQs are
    # internal and shared: a tenant learns of its rejected input from the rejection reply.
    return TopicSpec(
        suffix=spec.suffix + DLQ_SUFFIX,
        event=DeadLetter,
        partitions=1,
        retention_ms=30 * DAY_MS,
        max_message_bytes=spec.max_message_bytes * 2 + MIB,
        max_event_bytes=spec.max_message_bytes * 2 + MIB,
    )


_INPUTS = (
    TopicSpec("chat.requests", ChatRequest, has_dlq=True, per_tenant=True),
    TopicSpec("chat.enriched", EnrichedRequest, max_event_bytes=4 * MIB, has_dlq=True),
    TopicSpec("chat.responses", ChatResponse, per_tenant=True),
    TopicSpec("chat.tokens", TokenChunk, retention_ms=DAY_MS, per_tenant=True),
    TopicSpec("bulk.requests", ChatRequest, has_dlq=True, per_tenant=True),
    TopicSpec("bulk.enriched", EnrichedRequest, max_event_bytes=4 * MIB, has_dlq=True),
    TopicSpec("bulk.responses", ChatResponse, retention_ms=14 * DAY_MS, per_tenant=True),
    TopicSpec(
        "docs.ingest",
        DocumentIngest,
        max_message_bytes=24 * MIB,
        max_event_bytes=16 * MIB,
        has_dlq=True,
        per_tenant=True,
    ),
    TopicSpec("docs.ingested", IngestResult, per_tenant=True),
    # Cancels of the tenant's requests (both lanes): tiny records, kept as long as a worker holds
    # a cancel; one partition, since every worker reads every tenant's cancels.
    TopicSpec(
        "chat.cancel",
        CancelRequest,
        partitions=1,
        retention_ms=limits.CANCEL_TTL_S * 1000,
        max_message_bytes=4 * limits.CANCEL_EVENT_BYTES_MAX,
        max_event_bytes=limits.CANCEL_EVENT_BYTES_MAX,
        has_dlq=True,
        per_tenant=True,
    ),
)

#: Every declared topic, DLQs included, in declaration order.
TOPICS: tuple[TopicSpec, ...] = tuple(
    t for spec in _INPUTS for t in ((spec, _dlq(spec)) if spec.has_dlq else (spec,))
)
#: The topics every deployment has once (internal: enriched requests and dead letters).
SHARED_TOPICS: tuple[TopicSpec, ...] = tuple(t for t in TOPICS if not t.per_tenant)
#: The topics each tenant has its own copy of.
TENANT_TOPICS: tuple[TopicSpec, ...] = tuple(t for t in TOPICS if t.per_tenant)
#: Of those, what a tenant writes (its requests) and what it reads (its replies).
TENANT_WRITES: tuple[str, ...] = ("chat.requests", "bulk.requests", "docs.ingest", "chat.cancel")
TENANT_READS: tuple[str, ...] = ("chat.responses", "chat.tokens", "bulk.responses", "docs.ingested")

_BY_SUFFIX = {t.suffix: t for t in TOPICS}
_TENANT_NAME = re.compile(
    r"^(?P<prefix>.+)\.t\.(?P<tenant>[A-Za-z0-9][A-Za-z0-9_-]*)\.(?P<suffix>"
    + "|".join(re.escape(t.suffix) for t in TENANT_TOPICS)
    + r")$"
)


def spec(suffix: str) -> TopicSpec:
    return _BY_SUFFIX[suffix]


def topic_names(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """The shared (internal) topics of a deployment; each tenant's are `tenant_topic_names`."""
    return [t.name(prefix) for t in SHARED_TOPICS]


def tenant_topic_names(tenant: str, prefix: str = DEFAULT_PREFIX) -> list[str]:
    return [t.name(prefix, tenant) for t in TENANT_TOPICS]


def split_tenant_topic(topic: str, prefix: str | None = None) -> tuple[str, str] | None:
    """(tenant, suffix) of a tenant topic (under `prefix` when given), else None."""
    found = _TENANT_NAME.match(topic)
    if found is None or (prefix is not None and found["prefix"] != prefix):
        return None
    if len(found["tenant"]) > limits.TENANT_ID_MAX:
        return None
    return found["tenant"], found["suffix"]


def tenant_of(topic: str, prefix: str | None = None) -> str | None:
    """The tenant that owns `topic`, or None for a shared or foreign topic. This, not a payload's
    `tenant_id`, is who sent a request: only that tenant's principal may write there."""
    split = split_tenant_topic(topic, prefix)
    return split[0] if split else None


def dlq_name(topic: str) -> str:
    """The dead-letter topic for records read from `topic`: a tenant topic's dead letters go to the
    shared internal DLQ of its suffix (`ragbus.t.acme.chat.requests` → `ragbus.chat.requests.dlq`)."""
    found = _TENANT_NAME.match(topic)
    if found is not None:
        return f"{found['prefix']}.{found['suffix']}{DLQ_SUFFIX}"
    return topic + DLQ_SUFFIX


def spec_for_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> TopicSpec | None:
    """The spec of a full topic name, or None when the topic is not a declared ragbus topic."""
    split = split_tenant_topic(topic, prefix)
    if split is not None:
        return _BY_SUFFIX[split[1]]
    head = prefix + "."
    found = _BY_SUFFIX.get(topic[len(head) :]) if topic.startswith(head) else None
    return found if found is not None and not found.per_tenant else None


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


class TenantTopics:
    """One tenant's topic names: `Topics("ragbus").tenant("acme").requests("chat")`."""

    def __init__(self, prefix: str, tenant: str) -> None:
        self.prefix = prefix
        self.tenant = check_tenant(tenant)

    def _n(self, suffix: str) -> str:
        return _BY_SUFFIX[suffix].name(self.prefix, self.tenant)

    def requests(self, lane: Lane) -> str:
        return self._n(f"{lane}.requests")

    def responses(self, lane: Lane) -> str:
        return self._n(f"{lane}.responses")

    @property
    def tokens(self) -> str:
        return self._n("chat.tokens")

    @property
    def cancel(self) -> str:
        """Where the tenant's cancels go (of requests on either lane)."""
        return self._n("chat.cancel")

    @property
    def docs_ingest(self) -> str:
        return self._n("docs.ingest")

    @property
    def docs_ingested(self) -> str:
        return self._n("docs.ingested")

    def all(self) -> list[str]:
        return tenant_topic_names(self.tenant, self.prefix)


class Topics:
    """Full topic names under one prefix: `Topics("ragbus").enriched("chat")` for the internal
    topics, `Topics("ragbus").tenant("acme").requests("chat")` for a tenant's."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix

    def _n(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def tenant(self, tenant: str) -> TenantTopics:
        return TenantTopics(self.prefix, tenant)

    def enriched(self, lane: Lane) -> str:
        return self._n(f"{lane}.enriched")

    def dlq(self, topic: str) -> str:
        return dlq_name(topic)

    def dlq_of(self, suffix: str) -> str:
        """The shared DLQ of an input suffix, e.g. `dlq_of("chat.requests")`."""
        return self._n(suffix + DLQ_SUFFIX)

    def all(self) -> list[str]:
        """The shared (internal) topics; a tenant's are `tenant(name).all()`."""
        return topic_names(self.prefix)

    def tenant_pattern(self, *suffixes: str) -> str:
        """Regex matching every tenant's topic with one of `suffixes` under this prefix (for the
        processors, which serve all tenants), e.g. `tenant_pattern("chat.requests")`."""
        head = re.escape(self.prefix) + r"\.t\.[A-Za-z0-9][A-Za-z0-9_-]*\."
        return "^" + head + "(" + "|".join(re.escape(s) for s in suffixes) + ")$"

    def tenant_of(self, topic: str) -> str | None:
        return tenant_of(topic, self.prefix)

    @property
    def pattern(self) -> str:
        """Regex matching every topic under the prefix, tenant topics, DLQs and undeclared ones
        included (for pattern subscriptions), except another deployment's whose prefix extends
        this one: with prefix `ragbus`, `ragbus.models.updates` and `ragbus.t.acme.chat.requests`
        match, `ragbus.staging.chat.requests` does not."""
        head = re.escape(self.prefix)
        suffixes = "|".join(re.escape(t.suffix) for t in TENANT_TOPICS)
        tenant = r"t\.[A-Za-z0-9][A-Za-z0-9_-]*\.(" + suffixes + ")"
        return "^" + head + r"\.(" + tenant + r"$|(?!.+\.(chat|bulk|docs)\.).+)"
