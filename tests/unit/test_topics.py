import re

import pytest

from schemas import TOPICS, Topics, spec_for_topic
from schemas.tenants import tenant_acls, tenant_principal
from schemas.topics import (
    TENANT_READS,
    TENANT_TOPICS,
    TENANT_WRITES,
    dlq_name,
    spec,
    tenant_topic_names,
    topic_names,
)


def test_declared_topics() -> None:
    shared = topic_names()
    assert set(shared) == {"ragbus.chat.enriched", "ragbus.bulk.enriched"} | {
        f"ragbus.{s}.dlq"
        for s in (
            "chat.requests",
            "chat.enriched",
            "bulk.requests",
            "bulk.enriched",
            "docs.ingest",
            "chat.cancel",
        )
    }
    own = tenant_topic_names("acme")
    for lane in ("chat", "bulk"):
        for kind in ("requests", "responses"):
            assert f"ragbus.t.acme.{lane}.{kind}" in own
    assert {"ragbus.t.acme.chat.tokens", "ragbus.t.acme.docs.ingest", "ragbus.t.acme.docs.ingested"} <= set(
        own
    )
    assert "ragbus.t.acme.chat.cancel" in own
    assert len(own) == len(set(own)) == 8
    # a tenant writes only its requests and reads only its replies; the two sets cover its topics
    assert sorted(TENANT_WRITES + TENANT_READS) == sorted(t.suffix for t in TENANT_TOPICS)


def test_the_tenant_of_a_topic_is_its_name_never_a_lookalike() -> None:
    t = Topics("ragbus")
    assert t.tenant_of("ragbus.t.acme.chat.requests") == "acme"
    assert t.tenant_of("ragbus.t.acme.chat.enriched") is None  # internal topics belong to no tenant
    assert t.tenant_of("other.t.acme.chat.requests") is None
    assert t.tenant_of("ragbus.t.a.b.chat.requests") is None  # dots cannot smuggle a second tenant
    assert t.tenant_of("ragbus.chat.requests") is None
    assert dlq_name("ragbus.t.acme.docs.ingest") == "ragbus.docs.ingest.dlq" == t.dlq_of("docs.ingest")
    assert dlq_name("ragbus.chat.enriched") == "ragbus.chat.enriched.dlq"
    pattern = re.compile(t.tenant_pattern("chat.requests", "docs.ingest"))
    assert pattern.match("ragbus.t.acme.chat.requests") and pattern.match("ragbus.t.b-2.docs.ingest")
    assert not pattern.match("ragbus.t.acme.chat.responses")
    assert not pattern.match("ragbus.t.a.b.chat.requests")
    for bad in ("", "a.b", "a b", "-x", "x" * 65, "a:b", "a@b"):
        with pytest.raises(ValueError, match="invalid tenant name"):
            t.tenant(bad)


def test_a_tenant_topic_needs_a_tenant_and_a_shared_one_refuses_one() -> None:
    with pytest.raises(ValueError, match="needs a tenant"):
        spec("chat.requests").name()
    with pytest.raises(ValueError, match="shared"):
        spec("chat.enriched").name(tenant="acme")


def test_tenant_acls_allow_only_own_requests_and_replies() -> None:
    acls = tenant_acls("acme")
    writes = {a.resource_name for a in acls if a.operation == "WRITE"}
    reads = {a.resource_name for a in acls if a.operation == "READ" and a.resource_type == "TOPIC"}
    assert writes == {
        "ragbus.t.acme.chat.requests",
        "ragbus.t.acme.bulk.requests",
        "ragbus.t.acme.docs.ingest",
        "ragbus.t.acme.chat.cancel",
    }
    assert reads == {
        "ragbus.t.acme.chat.responses",
        "ragbus.t.acme.chat.tokens",
        "ragbus.t.acme.bulk.responses",
        "ragbus.t.acme.docs.ingested",
    }
    assert all(a.pattern_type == "LITERAL" for a in acls if a.resource_type == "TOPIC")
    groups = [a for a in acls if a.resource_type == "GROUP"]
    assert [(g.resource_name, g.pattern_type) for g in groups] == [("ragbus.t.acme.", "PREFIXED")]
    assert tenant_principal("acme") == "ragbus.t.acme" != tenant_principal("acme", "staging")


def test_dlq_can_hold_whatever_its_source_accepts() -> None:
    for declared in TOPICS:
        if declared.has_dlq:
            source = declared.name(tenant="x") if declared.per_tenant else declared.name()
            dlq = spec_for_topic(dlq_name(source))
            assert dlq is not None
            # base64 grows the original by 4/3, plus the dead letter's own fields
            assert dlq.max_message_bytes >= declared.max_message_bytes * 4 // 3 + 64 * 1024
        assert declared.max_event_bytes <= declared.max_message_bytes


def test_prefix_and_pattern() -> None:
    t = Topics("acme.prod")
    assert t.tenant("x").requests("chat") == "acme.prod.t.x.chat.requests"
    assert t.dlq(t.enriched("bulk")) == "acme.prod.bulk.enriched.dlq"
    pattern = re.compile(t.pattern)
    assert all(pattern.match(n) for n in t.all() + t.tenant("x").all())
    assert not pattern.match("acmexprod.chat.enriched")
    assert pattern.match("acme.prod.models.updates")  # undeclared topics are audited too
    # ...but not another deployment's, whose prefix extends this one.
    assert not any(pattern.match(n) for n in Topics("acme.prod.staging").all())
    assert not any(pattern.match(n) for n in Topics("acme.prod.staging").tenant("x").all())
    assert spec_for_topic("acme.prod.t.x.chat.requests", "acme.prod") is not None
    assert spec_for_topic("acme.prod.chat.requests", "acme.prod") is None  # per tenant only
    assert spec_for_topic("other.t.x.chat.requests", "acme.prod") is None
