"""Topic declaration creates the declared list once and is idempotent after that."""

from __future__ import annotations

from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from infra.kafka.clients import make_admin
from infra.kafka.topics import declare_topics
from infra.settings import Settings
from schemas.topics import TOPICS, spec


async def test_declaration_is_idempotent(base_settings: Settings) -> None:
    first = await declare_topics(base_settings)
    assert sorted(first.created) == sorted(t.name(base_settings.topic_prefix) for t in TOPICS)
    second = await declare_topics(base_settings)
    assert second.created == [] and sorted(second.existing) == sorted(first.created)
    assert second.under_partitioned == {}


async def test_topics_carry_their_declared_settings(base_settings: Settings) -> None:
    s = base_settings.model_copy(update={"kafka_partitions": None})
    await declare_topics(s)
    admin = make_admin(s)
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics(s.topics.all())}
        assert len(described[s.topics.requests("chat")]["partitions"]) == spec("chat.requests").partitions
        assert len(described[s.topics.dlq(s.topics.requests("chat"))]["partitions"]) == 1
        name = s.topics.docs_ingest
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        values = {entry[0]: entry[1] for entry in configs[0].resources[0][4]}
        assert values["max.message.bytes"] == str(spec("docs.ingest").max_message_bytes)
        assert values["retention.ms"] == str(spec("docs.ingest").retention_ms)
        assert values["cleanup.policy"] == "delete"
    finally:
        await admin.close()
