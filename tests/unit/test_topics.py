import re

from schemas import TOPICS, Topics, spec_for_topic
from schemas.topics import topic_names


def test_declared_topics() -> None:
    names = topic_names()
    for lane in ("chat", "bulk"):
        for kind in ("requests", "enriched", "responses"):
            assert f"ragbus.{lane}.{kind}" in names
    assert {"ragbus.chat.tokens", "ragbus.docs.ingest", "ragbus.docs.ingested"} <= set(names)
    inputs = {"chat.requests", "chat.enriched", "bulk.requests", "bulk.enriched", "docs.ingest"}
    for suffix in inputs:
        assert f"ragbus.{suffix}.dlq" in names
    assert len(names) == len(set(names)) == 9 + len(inputs)


def test_dlq_can_hold_whatever_its_source_accepts() -> None:
    for spec in TOPICS:
        if spec.has_dlq:
            dlq = spec_for_topic(spec.name() + ".dlq")
            assert dlq is not None
            # base64 grows the original by 4/3, plus the dead letter's own fields
            assert dlq.max_message_bytes >= spec.max_message_bytes * 4 // 3 + 64 * 1024
        assert spec.max_event_bytes <= spec.max_message_bytes


def test_prefix_and_pattern() -> None:
    t = Topics("acme.prod")
    assert t.requests("chat") == "acme.prod.chat.requests"
    assert t.dlq(t.enriched("bulk")) == "acme.prod.bulk.enriched.dlq"
    pattern = re.compile(t.pattern)
    assert all(pattern.match(n) for n in t.all())
    assert not pattern.match("acmexprod.chat.requests")
    assert pattern.match("acme.prod.models.updates")  # undeclared topics are audited too
    # ...but not another deployment's, whose prefix extends this one.
    assert not any(pattern.match(n) for n in Topics("acme.prod.staging").all())
    assert spec_for_topic("acme.prod.chat.requests", "acme.prod") is not None
    assert spec_for_topic("other.chat.requests", "acme.prod") is None
