"""Topic declaration creates the declared list once and is idempotent after that."""

from __future__ import annotations

from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from infra.kafka.clients import make_admin
from infra.kafka.topics import declare_topics
from infra.settings import Settings
from schemas.topics import spec, tenant_topic_names, topic_names


async def test_declaration_is_idempotent(base_settings: Settings) -> None:
    prefix = base_settings.topic_prefix
    first = await declare_topics(base_settings, tenants=["acme"])
    assert sorted(first.created) == sorted(topic_names(prefix) + tenant_topic_names("acme", prefix))
    second = await declare_topics(base_settings, tenants=["acme"])
    assert second.created == [] and sorted(second.existing) == sorted(first.created)
    assert second.under_partitioned == {}


async def test_topics_carry_their_declared_settings(base_settings: Settings) -> None:
    s = base_settings.model_copy(update={"kafka_partitions": None})
    await declare_topics(s, tenants=["acme"])
    acme = s.topics.tenant("acme")
    admin = make_admin(s)
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics(s.topics.all() + acme.all())}
        assert len(described[acme.requests("chat")]["partitions"]) == spec("chat.requests").partitions
        assert len(described[s.topics.dlq(acme.requests("chat"))]["partitions"]) == 1
        name = acme.docs_ingest
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        values = {entry[0]: entry[1] for entry in configs[0].resources[0][4]}
        assert values["max.message.bytes"] == str(spec("docs.ingest").max_message_bytes)
        assert values["retention.ms"] == str(spec("docs.ingest").retention_ms)
        assert values["cleanup.policy"] == "delete"
    finally:
        await admin.close()
