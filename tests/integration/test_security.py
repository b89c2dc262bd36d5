"""The session's broker is authenticated like `ragbus up`'s (SASL/SCRAM-SHA-512, StandardAuthorizer,
nothing allowed without an ACL): a client without credentials gets no metadata, and a tenant made
with `infra.kafka.security` (what `ragbus tenants add` runs) may write only its own request topics
and read only its own reply topics — the broker answers anything else with an authorization error.
"""

from __future__ import annotations

import asyncio
import stat

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
)
from pydantic import SecretStr

from infra.kafka.clients import make_admin, make_consumer, make_producer
from infra.kafka.security import (
    add_tenant,
    describe_acls,
    describe_scram_users,
    list_tenants,
    remove_tenant,
    rotate_tenant,
)
from infra.secrets import as_tenant, secrets_dir, tenant_password_path
from infra.settings import Settings
from schemas.tenants import tenant_acls, tenant_group_prefix, tenant_principal
from schemas.topics import TENANT_TOPICS
from tests.helpers import read_topic, wait_for

AUTH_ERRORS = (TopicAuthorizationFailedError, GroupAuthorizationFailedError)


async def _produce(settings: Settings, topic: str, value: bytes = b"{}") -> None:
    producer = make_producer(settings, request_timeout_ms=8000)
    await producer.start()
    try:
        await asyncio.wait_for(producer.send_and_wait(topic, value, partition=0), 20)
    finally:
        await producer.stop()


async def _fetch(settings: Settings, topic: str, *, tries: int = 10) -> list[bytes]:
    """Read partition 0 of `topic` from the start (no group): what the broker lets this principal see."""
    consumer = make_consumer(settings, group_id=None, request_timeout_ms=8000)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        out: list[bytes] = []
        for _ in range(tries):
            batch = await consumer.getmany(tp, timeout_ms=500)
            out.extend(r.value for r in batch.get(tp, []))
            if out:
                break
        return out
    finally:
        await consumer.stop()


def _without_credentials(settings: Settings, **kw: object) -> Settings:
    return settings.model_copy(
        update={
            "kafka_security_protocol": "PLAINTEXT",
            "kafka_sasl_mechanism": None,
            "kafka_sasl_username": None,
            "kafka_sasl_password": None,
            "kafka_request_timeout_ms": 5000,
            **kw,
        }
    )


@pytest.fixture
async def tenants(settings: Settings) -> tuple[Settings, Settings]:
    """Tenants `acme` (A) and `t` (B), made as `ragbus tenants add` makes them; settings acting as each."""
    assert settings.kafka_security_protocol == "SASL_PLAINTEXT", "the session broker must be secure"
    for name in ("acme", "t"):
        creds = await add_tenant(settings, name)
        assert creds is not None and creds.principal == tenant_principal(name, settings.topic_prefix)
    return as_tenant(settings, "acme"), as_tenant(settings, "t")


async def test_a_client_without_credentials_gets_no_metadata(settings: Settings) -> None:
    assert _refused_probe(settings)
    admin = make_admin(_without_credentials(settings))
    with pytest.raises(KafkaError):
        try:
            await asyncio.wait_for(admin.start(), 30)
            await admin.list_topics()
        finally:
            await admin.close()


def _refused_probe(settings: Settings) -> bool:
    """A metadata probe without credentials either finds no broker or fails outright."""
    from infra.kafka.broker import probe_brokers

    try:
        return probe_brokers(settings.bootstrap, timeout=5.0) == set()
    except Exception:  # noqa: BLE001 - refused is the expected outcome
        return True


@pytest.mark.parametrize("who", ["wrong-password", "unknown-user"])
async def test_bad_credentials_are_refused(settings: Settings, who: str) -> None:
    update = (
        {"kafka_sasl_password": SecretStr("not-the-password")}
        if who == "wrong-password"
        else {"kafka_sasl_username": "mallory"}
    )
    with pytest.raises(KafkaError):
        await _produce(settings.model_copy(update=update), settings.topics.tenant("acme").requests("chat"))


async def test_tenant_writes_only_its_requests_and_reads_only_its_replies(
    settings: Settings, tenants: tuple[Settings, Settings]
) -> None:
    a, _ = tenants
    mine, theirs = settings.topics.tenant("acme"), settings.topics.tenant("t")

    # Its own request topic: allowed, and the record is there.
    await _produce(a, mine.requests("chat"), b'{"own": true}')
    assert [r.value for r in await read_topic(settings, mine.requests("chat"))] == [b'{"own": true}']

    # B's request topics: the broker refuses the write; nothing lands.
    for topic in (theirs.requests("chat"), theirs.requests("bulk"), theirs.docs_ingest):
        with pytest.raises(AUTH_ERRORS):
            await _produce(a, topic, b'{"forged": true}')
        assert await read_topic(settings, topic) == []
    # Nor may it write its own reply topics (only components answer) or an internal topic.
    for topic in (mine.responses("chat"), settings.topics.enriched("chat")):
        with pytest.raises(AUTH_ERRORS):
            await _produce(a, topic, b'{"forged": true}')

    # Replies: the components (super user) write to both tenants; A reads only its own.
    await _produce(settings, mine.responses("chat"), b"for-acme")
    await _produce(settings, theirs.responses("chat"), b"for-t")
    await _produce(settings, theirs.tokens, b"t-token")
    await _produce(settings, settings.topics.enriched("chat"), b"internal")
    assert await _fetch(a, mine.responses("chat")) == [b"for-acme"]
    assert await _topic_error(a, mine.responses("chat")) == 0
    for topic in (
        theirs.responses("chat"),
        theirs.tokens,
        settings.topics.enriched("chat"),
        settings.topics.dlq_of("chat.requests"),
        theirs.requests("chat"),
    ):
        # The broker answers A's metadata request for the topic with TOPIC_AUTHORIZATION_FAILED,
        # so A's consumer never learns a leader to fetch from, and reads nothing.
        assert await _topic_error(a, topic) == TopicAuthorizationFailedError.errno, topic
        assert await _fetch(a, topic, tries=4) == []


async def _topic_error(settings: Settings, topic: str) -> int:
    """The error code the broker puts on `topic` in a metadata answer to this principal."""
    admin = make_admin(settings)
    await admin.start()
    try:
        (entry,) = await admin.describe_topics([topic])
        return int(entry["error_code"])
    finally:
        await admin.close()


async def test_tenant_groups_only_under_its_prefix(
    settings: Settings, tenants: tuple[Settings, Settings]
) -> None:
    a, _ = tenants
    topic = settings.topics.tenant("acme").responses("chat")
    await _produce(settings, topic, b"grouped")

    async def read_in(group: str) -> list[bytes]:
        consumer = make_consumer(a, topic, group_id=group, request_timeout_ms=8000)
        await consumer.start()
        try:
            batch = await consumer.getmany(timeout_ms=10_000)
            return [r.value for recs in batch.values() for r in recs]
        finally:
            await consumer.stop()

    assert await read_in(tenant_group_prefix("acme", settings.topic_prefix) + "sync") == [b"grouped"]
    with pytest.raises(AUTH_ERRORS):
        await read_in(tenant_group_prefix("t", settings.topic_prefix) + "sync")


async def test_rotate_makes_the_old_password_fail(
    settings: Settings, tenants: tuple[Settings, Settings]
) -> None:
    old, _ = tenants
    topic = settings.topics.tenant("acme").requests("chat")
    await _produce(old, topic)
    new = await rotate_tenant(settings, "acme")
    assert new.password != old.kafka_sasl_password.get_secret_value()  # type: ignore[union-attr]
    with pytest.raises(KafkaError):
        await _produce(old, topic)
    fresh = as_tenant(settings, "acme")  # reads the stored (rotated) password
    assert fresh.kafka_sasl_password.get_secret_value() == new.password  # type: ignore[union-attr]
    await _produce(fresh, topic)


async def test_secrets_are_private(settings: Settings, tenants: tuple[Settings, Settings]) -> None:
    path = tenant_password_path(settings, "acme")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (path.parent, secrets_dir(settings)):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


async def test_list_and_remove(settings: Settings, tenants: tuple[Settings, Settings]) -> None:
    a, _ = tenants
    principal = tenant_principal("acme", settings.topic_prefix)
    expected = len(tenant_acls("acme", settings.topic_prefix))

    async def listed() -> dict[str, object]:
        return {t.tenant: t for t in await list_tenants(settings)}

    found = await wait_for(
        lambda: _acme_ready(listed, expected), timeout=20, what="acme listed with its user and ACLs"
    )
    assert found.has_user and found.password_stored and len(found.topics) == len(TENANT_TOPICS)

    removed = await remove_tenant(settings, "acme")
    assert removed.acls == expected and removed.user and removed.topics == []
    assert not tenant_password_path(settings, "acme").exists()
    with pytest.raises(KafkaError):
        await _produce(a, settings.topics.tenant("acme").requests("chat"))
    admin = make_admin(settings)
    await admin.start()
    try:
        assert principal not in await describe_scram_users(admin)
        assert await describe_acls(admin, principal) == []
        assert settings.topics.tenant("acme").requests("chat") in await admin.list_topics()
    finally:
        await admin.close()

    removed = await remove_tenant(settings, "acme", delete_topics=True)
    assert len(removed.topics) == len(TENANT_TOPICS) and not removed.user


async def _acme_ready(listed, expected: int):  # type: ignore[no-untyped-def]
    acme = (await listed()).get("acme")
    return acme if acme is not None and acme.acls == expected else None
