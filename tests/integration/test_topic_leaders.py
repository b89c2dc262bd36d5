"""`declare_topics` returns only once every partition of the declared topics has a leader that
serves it, so the components a fresh deployment starts next do not log NotLeaderForPartition."""

from __future__ import annotations

import logging

import pytest
from aiokafka import TopicPartition

from infra.kafka.clients import make_admin, make_producer
from infra.kafka.topics import declare_topics, declared_names, wait_for_leaders
from infra.settings import Settings
from schemas.topics import TOPICS


async def test_declared_topics_are_led_when_declare_returns(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    declared = await declare_topics(base_settings, tenants=["acme"])
    names = sorted(declared.created)
    assert names == sorted(declared_names(base_settings.topic_prefix, ["acme"]))
    assert len(names) == len(TOPICS)  # the shared topics and one tenant's: each declared once

    admin = make_admin(base_settings)
    await admin.start()
    try:
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    assert sorted(t["topic"] for t in described) == names
    for t in described:
        assert t["error_code"] == 0 and t["partitions"], t
        assert all(p["leader"] >= 0 for p in t["partitions"]), t

    # Right away, one record to every partition: each leader takes it on the first try.
    tps = [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]
    caplog.set_level(logging.WARNING, logger="aiokafka")
    producer = make_producer(base_settings)
    await producer.start()
    try:
        for tp in tps:
            await producer.send(tp.topic, b"{}", partition=tp.partition)
        await producer.flush()
    finally:
        await producer.stop()
    errors = [r.getMessage() for r in caplog.records if "NotLeader" in r.getMessage()]
    assert errors == []


async def test_missing_topic_times_out_naming_it(base_settings: Settings) -> None:
    missing = f"{base_settings.topic_prefix}.never-declared"
    with pytest.raises(TimeoutError, match=missing):
        await wait_for_leaders(base_settings, [missing], timeout=1.0)
